"""Compare two runs over the same PDFs: per-page diff and similarity, per-document and overall summary.

Use it to check a setting (low-VRAM profile, quantised weights, another resolution, the
Transformers engine) against the default on your own documents::

    python tools/compare_runs.py out/default out/low-vram                  # text report
    python tools/compare_runs.py out/default out/low-vram --json cmp.json  # plus JSON
    python tools/compare_runs.py A B --diff none --below 0.95              # only list pages < 0.95

In: two output folders written by the runner (``<stem>.pages.jsonl``, one JSON line per page with
its ``markdown``; a folder with only ``<stem>.md`` files is compared per document). Out: for each
page a similarity in [0, 1] (``difflib`` ratio over words, or characters with ``--unit char``)
and a unified diff of the page text; a summary per document and for the whole run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PAGES_SUFFIX = ".pages.jsonl"
MD_SUFFIX = ".md"


@dataclass(frozen=True)
class PageText:
    page: int  # 1-based
    text: str
    status: str | None = None


@dataclass(frozen=True)
class PageComparison:
    page: int
    similarity: float  # 1.0 = identical text
    identical: bool
    status_a: str | None
    status_b: str | None
    chars_a: int
    chars_b: int
    diff: str  # unified diff ("" when identical or diffs were not asked for)


@dataclass(frozen=True)
class DocComparison:
    doc: str  # output stem relative to the run folder
    pages: tuple[PageComparison, ...]
    pages_only_in_a: tuple[int, ...] = ()
    pages_only_in_b: tuple[int, ...] = ()

    @property
    def mean_similarity(self) -> float:
        return _mean([p.similarity for p in self.pages])

    @property
    def min_similarity(self) -> float:
        return min((p.similarity for p in self.pages), default=1.0)


@dataclass(frozen=True)
class RunComparison:
    run_a: str
    run_b: str
    unit: str
    documents: tuple[DocComparison, ...]
    docs_only_in_a: tuple[str, ...] = ()
    docs_only_in_b: tuple[str, ...] = ()
    overall: dict[str, Any] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 1.0


# -- loading ------------------------------------------------------------------------------------


def load_run(folder: Path) -> dict[str, list[PageText]]:
    """Pages of every document in a run folder, keyed by output stem (``sub/doc``)."""
    docs: dict[str, list[PageText]] = {}
    for path in sorted(folder.rglob("*" + PAGES_SUFFIX)):
        stem = path.relative_to(folder).as_posix()[: -len(PAGES_SUFFIX)]
        pages = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            pages.append(PageText(int(row["page"]), str(row.get("markdown") or ""), row.get("status")))
        docs[stem] = sorted(pages, key=lambda p: p.page)
    for path in sorted(folder.rglob("*" + MD_SUFFIX)):
        stem = path.relative_to(folder).as_posix()[: -len(MD_SUFFIX)]
        if stem not in docs:  # no per-page records: the whole document is one "page"
            docs[stem] = [PageText(1, path.read_text(encoding="utf-8"))]
    return docs


# -- comparing ----------------------------------------------------------------------------------


def similarity(a: str, b: str, unit: str = "word") -> float:
    """``difflib`` ratio of the two texts split into words (default) or characters."""
    if a == b:
        return 1.0
    sa: Sequence[str] = a.split() if unit == "word" else a
    sb: Sequence[str] = b.split() if unit == "word" else b
    if not sa and not sb:
        return 1.0  # differ only in whitespace
    return difflib.SequenceMatcher(None, sa, sb, autojunk=False).ratio()


def page_diff(a: str, b: str, name: str, context: int = 2) -> str:
    lines = difflib.unified_diff(
        a.splitlines(), b.splitlines(), fromfile=f"a/{name}", tofile=f"b/{name}", n=context, lineterm=""
    )
    return "\n".join(lines)


def compare_page(
    a: PageText, b: PageText, doc: str, *, unit: str = "word", with_diff: bool = True, context: int = 2
) -> PageComparison:
    sim = similarity(a.text, b.text, unit)
    identical = a.text == b.text
    diff = page_diff(a.text, b.text, f"{doc}#page{a.page}", context) if with_diff and not identical else ""
    return PageComparison(
        page=a.page,
        similarity=round(sim, 6),
        identical=identical,
        status_a=a.status,
        status_b=b.status,
        chars_a=len(a.text),
        chars_b=len(b.text),
        diff=diff,
    )


def compare_runs(
    run_a: Path, run_b: Path, *, unit: str = "word", with_diff: bool = True, context: int = 2
) -> RunComparison:
    if unit not in ("word", "char"):
        raise ValueError("unit must be 'word' or 'char'")
    docs_a, docs_b = load_run(run_a), load_run(run_b)
    documents = []
    for doc in sorted(set(docs_a) & set(docs_b)):
        pa = {p.page: p for p in docs_a[doc]}
        pb = {p.page: p for p in docs_b[doc]}
        pages = tuple(
            compare_page(pa[n], pb[n], doc, unit=unit, with_diff=with_diff, context=context)
            for n in sorted(set(pa) & set(pb))
        )
        documents.append(
            DocComparison(
                doc=doc,
                pages=pages,
                pages_only_in_a=tuple(sorted(set(pa) - set(pb))),
                pages_only_in_b=tuple(sorted(set(pb) - set(pa))),
            )
        )
    all_pages = [p for d in documents for p in d.pages]
    overall = {
        "documents": len(documents),
        "pages": len(all_pages),
        "identical_pages": sum(p.identical for p in all_pages),
        "status_changed_pages": sum(p.status_a != p.status_b for p in all_pages),
        "mean_page_similarity": round(_mean([p.similarity for p in all_pages]), 6),
        "mean_document_similarity": round(_mean([d.mean_similarity for d in documents]), 6),
        "min_page_similarity": round(min((p.similarity for p in all_pages), default=1.0), 6),
    }
    return RunComparison(
        run_a=str(run_a),
        run_b=str(run_b),
        unit=unit,
        documents=tuple(documents),
        docs_only_in_a=tuple(sorted(set(docs_a) - set(docs_b))),
        docs_only_in_b=tuple(sorted(set(docs_b) - set(docs_a))),
        overall=overall,
    )


# -- reporting ----------------------------------------------------------------------------------


def to_json(cmp: RunComparison) -> dict[str, Any]:
    out = asdict(cmp)
    for doc, d in zip(out["documents"], cmp.documents):
        doc["mean_similarity"] = round(d.mean_similarity, 6)
        doc["min_similarity"] = round(d.min_similarity, 6)
    return out


def render_text(cmp: RunComparison, *, below: float = 1.0, show_diff: bool = True) -> str:
    """Human report; pages with similarity >= ``below`` are summarised, not listed."""
    o = cmp.overall
    lines = [
        f"A: {cmp.run_a}",
        f"B: {cmp.run_b}",
        f"similarity: difflib ratio over {cmp.unit}s (1.0 = identical)",
        "",
    ]
    for d in cmp.documents:
        changed = [p for p in d.pages if p.similarity < below]
        lines.append(
            f"{d.doc}: {len(d.pages)} page(s), mean {d.mean_similarity:.4f}, min {d.min_similarity:.4f}, "
            f"{sum(p.identical for p in d.pages)} identical"
        )
        if d.pages_only_in_a or d.pages_only_in_b:
            lines.append(
                f"  pages only in A: {list(d.pages_only_in_a)}; only in B: {list(d.pages_only_in_b)}"
            )
        for p in changed:
            status = "" if p.status_a == p.status_b else f"  status {p.status_a} -> {p.status_b}"
            lines.append(f"  page {p.page}: {p.similarity:.4f} ({p.chars_a} -> {p.chars_b} chars){status}")
            if show_diff and p.diff:
                lines.extend("    " + line for line in p.diff.splitlines())
    if cmp.docs_only_in_a:
        lines.append(f"only in A: {', '.join(cmp.docs_only_in_a)}")
    if cmp.docs_only_in_b:
        lines.append(f"only in B: {', '.join(cmp.docs_only_in_b)}")
    lines += [
        "",
        f"overall: {o['documents']} document(s), {o['pages']} page(s), {o['identical_pages']} identical, "
        f"{o['status_changed_pages']} with a different status",
        f"  mean page similarity {o['mean_page_similarity']:.4f}, mean document similarity "
        f"{o['mean_document_similarity']:.4f}, min page similarity {o['min_page_similarity']:.4f}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare two runs' per-page text: diff and similarity.")
    ap.add_argument("run_a", type=Path, help="output folder of the reference run")
    ap.add_argument("run_b", type=Path, help="output folder of the run to check")
    ap.add_argument("--json", type=Path, help="also write the full comparison (diffs included) here")
    ap.add_argument("--unit", choices=("word", "char"), default="word")
    ap.add_argument("--diff", choices=("changed", "none"), default="changed", help="diffs in the text report")
    ap.add_argument("--below", type=float, default=1.0, help="list pages with similarity below this")
    ap.add_argument("--context", type=int, default=2, help="context lines in diffs")
    args = ap.parse_args(argv)
    for folder in (args.run_a, args.run_b):
        if not folder.is_dir():
            print(f"error: {folder} is not a folder", file=sys.stderr)
            return 2
    try:
        cmp = compare_runs(args.run_a, args.run_b, unit=args.unit, context=args.context)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render_text(cmp, below=args.below, show_diff=args.diff == "changed"))
    if args.json:
        args.json.write_text(json.dumps(to_json(cmp), ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
