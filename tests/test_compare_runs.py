"""Tests for tools/compare_runs.py: per-page diff and similarity between two run folders."""

from __future__ import annotations

import difflib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest


def _load_tool() -> Any:
    path = Path(__file__).resolve().parents[1] / "tools" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_runs"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


cr = _load_tool()


def _write_run(root: Path, docs: dict[str, list[tuple[str, str]]]) -> Path:
    """Write ``<stem>.pages.jsonl`` + ``<stem>.md`` the way the runner does (page, status, markdown)."""
    for stem, pages in docs.items():
        path = root / (stem + ".pages.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"page": i + 1, "status": status, "markdown": md} for i, (status, md) in enumerate(pages)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / (stem + ".md")).write_text("\n\n".join(md for _, md in pages))
    return root


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a = _write_run(tmp_path / "a", {
        "report": [("ok", "# Title\n\nthe quick brown fox"), ("ok", "same page"), ("ok", "alpha beta")],
        "sub/scan": [("ok", "one two three four")],
        "only_a": [("ok", "x")],
    })  # fmt: skip
    b = _write_run(tmp_path / "b", {
        "report": [("ok", "# Title\n\nthe quick red fox"), ("ok", "same page")],
        "sub/scan": [("fallback_text_layer", "totally unrelated words here")],
        "only_b": [("ok", "y")],
    })  # fmt: skip
    return a, b


def test_similarity_is_difflib_ratio_over_words() -> None:
    assert cr.similarity("a b c d", "a b c d") == 1.0
    assert cr.similarity("a b c d", "a b x d") == pytest.approx(0.75)  # 2*3 matches / 8 words
    assert cr.similarity("a b", "c d") == 0.0
    assert cr.similarity("a  b\n", "a b") == 1.0  # whitespace-only changes do not count as words
    want = difflib.SequenceMatcher(None, "kitten", "sitting", autojunk=False).ratio()
    assert cr.similarity("kitten", "sitting", unit="char") == pytest.approx(want)


def test_compare_runs_pairs_documents_and_pages(runs: tuple[Path, Path]) -> None:
    a, b = runs
    cmp = cr.compare_runs(a, b)
    docs = {d.doc: d for d in cmp.documents}
    assert sorted(docs) == ["report", "sub/scan"]
    assert cmp.docs_only_in_a == ("only_a",) and cmp.docs_only_in_b == ("only_b",)
    report = docs["report"]
    assert [p.page for p in report.pages] == [1, 2] and report.pages_only_in_a == (3,)
    changed, same = report.pages
    assert same.identical and same.similarity == 1.0 and same.diff == ""
    assert changed.similarity == pytest.approx(
        cr.similarity("# Title\n\nthe quick brown fox", "# Title\n\nthe quick red fox")
    )
    assert "-the quick brown fox" in changed.diff and "+the quick red fox" in changed.diff
    assert "a/report#page1" in changed.diff
    scan = docs["sub/scan"].pages[0]
    assert scan.similarity == 0.0 and (scan.status_a, scan.status_b) == ("ok", "fallback_text_layer")
    o = cmp.overall
    assert (o["documents"], o["pages"], o["identical_pages"], o["status_changed_pages"]) == (2, 3, 1, 1)
    assert o["mean_page_similarity"] == pytest.approx((changed.similarity + 1.0 + 0.0) / 3, abs=1e-6)
    assert o["mean_document_similarity"] == pytest.approx(
        ((changed.similarity + 1.0) / 2 + 0.0) / 2, abs=1e-6
    )
    assert o["min_page_similarity"] == 0.0


def test_text_report_lists_changed_pages_with_diffs(runs: tuple[Path, Path]) -> None:
    text = cr.render_text(cr.compare_runs(*runs))
    assert "report: 2 page(s)" in text
    assert "page 1:" in text and "page 2:" not in text  # identical pages are summarised, not listed
    assert "+the quick red fox" in text
    assert "status ok -> fallback_text_layer" in text
    assert "only in A: only_a" in text and "only in B: only_b" in text
    cmp = cr.compare_runs(*runs)
    quiet = cr.render_text(cmp, below=0.5, show_diff=False)
    report_page = next(d for d in cmp.documents if d.doc == "report").pages[0]
    assert report_page.similarity > 0.5
    assert f"page 1: {report_page.similarity:.4f}" not in quiet  # above the threshold
    assert "page 1: 0.0000" in quiet and "+the quick red fox" not in quiet


def test_cli_writes_json(runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp.json"
    assert cr.main([str(runs[0]), str(runs[1]), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["overall"]["pages"] == 3
    report = next(d for d in data["documents"] if d["doc"] == "report")
    assert report["pages"][0]["diff"].startswith("--- a/report#page1")
    assert report["min_similarity"] == report["pages"][0]["similarity"]
    assert "overall: 2 document(s), 3 page(s)" in capsys.readouterr().out


def test_markdown_only_runs_compare_whole_documents(tmp_path: Path) -> None:
    for name, text in (("a", "hello world"), ("b", "hello there world")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "doc.md").write_text(text)
    (d,) = cr.compare_runs(tmp_path / "a", tmp_path / "b").documents
    assert d.doc == "doc" and len(d.pages) == 1
    assert d.pages[0].similarity == pytest.approx(cr.similarity("hello world", "hello there world"))


def test_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    assert cr.main([str(tmp_path / "nope"), str(tmp_path)]) == 2
