"""Post-processing stage: offline re-clean command.

In: a ``<stem>.pages.jsonl`` (records with ``page``, ``raw_text`` and optionally ``width_px``,
``height_px``, ``width_pt``, ``height_pt``) or a raw ``.txt`` (one page; form feeds split pages).
Out: the joined Markdown on standard output or written atomically to ``-o FILE``; with
``--regions FILE`` also the regions as JSON lines (page, label, box in 0-999 and PDF points, text);
``--counters`` prints the summed counters as JSON on standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postprocess.clean import clean_page
from postprocess.markdown import join_pages
from postprocess.records import CleanOptions, PageCleanResult, PageGeometry


@dataclass(frozen=True)
class RawPage:
    page: int  # 1-based
    raw_text: str
    geometry: PageGeometry | None


def _geometry(rec: dict[str, Any]) -> PageGeometry | None:
    try:
        return PageGeometry(
            int(rec["width_px"]), int(rec["height_px"]), float(rec["width_pt"]), float(rec["height_pt"])
        )
    except (KeyError, TypeError, ValueError):
        return None


def read_pages(path: Path) -> tuple[list[RawPage], list[str]]:
    """Read raw pages from a pages.jsonl or a .txt file. Bad lines are reported, not fatal."""
    text = path.read_text(encoding="utf-8", errors="replace")
    warnings: list[str] = []
    if not path.name.endswith(".jsonl"):
        return [RawPage(i + 1, t, None) for i, t in enumerate(text.split("\f"))], warnings
    pages: dict[int, RawPage] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            page = int(rec["page"])
            raw = rec.get("raw_text") or ""
            if not isinstance(raw, str) or page < 1:
                raise ValueError("raw_text must be a string and page >= 1")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.append(f"{path}:{lineno}: skipped ({type(exc).__name__}: {exc})")
            continue
        if page in pages:
            warnings.append(f"{path}:{lineno}: page {page} seen twice, keeping the last record")
        pages[page] = RawPage(page, raw, _geometry(rec))
    return [pages[k] for k in sorted(pages)], warnings


def write_atomic(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def regions_jsonl(results: Sequence[tuple[int, PageCleanResult]]) -> str:
    lines = []
    for page, res in results:
        for r in res.regions:
            lines.append(
                json.dumps(
                    {
                        "page": page,
                        "label": r.label,
                        "boxes": [list(b) for b in r.boxes],
                        "boxes_pt": [list(b) for b in r.boxes_pt],
                        "text": r.text,
                    },
                    ensure_ascii=False,
                )
            )
    return "".join(line + "\n" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m postprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="<stem>.pages.jsonl or a raw .txt")
    p.add_argument("--mode", choices=("clean", "grounded"), default="clean")
    p.add_argument("--table-format", choices=("html", "markdown"), default="html")
    p.add_argument("-o", "--output", type=Path, help="write here (atomically) instead of stdout")
    p.add_argument("--regions", type=Path, help="also write regions as JSON lines here")
    p.add_argument("--counters", action="store_true", help="print summed counters to stderr as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pages, warnings = read_pages(args.file)
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    options = CleanOptions(mode=args.mode, table_format=args.table_format)
    results = [(p.page, clean_page(p.raw_text, options=options, geometry=p.geometry)) for p in pages]
    # Page N stays page N even when a record is missing (a failed page keeps its place).
    last = max((p for p, _ in results), default=0)
    by_page = {p: r.markdown for p, r in results}
    doc = join_pages([by_page.get(n, "") for n in range(1, last + 1)])
    try:
        if args.output is not None:
            write_atomic(args.output, doc)
        else:
            sys.stdout.write(doc)
        if args.regions is not None:
            write_atomic(args.regions, regions_jsonl(results))
    except OSError as exc:
        print(f"error: cannot write: {exc}", file=sys.stderr)
        return 2
    if args.counters:
        total: Counter[str] = Counter()
        for _, r in results:
            total.update(r.counters)
        print(json.dumps(dict(sorted(total.items()))), file=sys.stderr)
    return 0
