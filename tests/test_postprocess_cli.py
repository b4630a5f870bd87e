"""Tests for postprocess.cli: offline re-clean of stored raw output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from postprocess.cli import main, read_pages

ROOT = Path(__file__).resolve().parents[1]
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
P1 = "<|ref|>title<|/ref|><|det|>[[10, 10, 900, 60]]<|/det|>\n# Report\n" + EOS
P3 = (
    "<|ref|>table<|/ref|><|det|>[[10, 10, 900, 600]]<|/det|>\n"
    "<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>None</td></tr></table>"
)


def _jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "doc.pages.jsonl"
    recs = [
        {
            "page": 3,
            "raw_text": P3,
            "width_px": 1000,
            "height_px": 1000,
            "width_pt": 500.0,
            "height_pt": 500.0,
        },
        {"page": 1, "raw_text": P1, "status": "ok"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n", encoding="utf-8")
    return path


def test_read_pages_sorted_and_bad_lines_reported(tmp_path: Path) -> None:
    pages, warnings = read_pages(_jsonl(tmp_path))
    assert [p.page for p in pages] == [1, 3]
    assert pages[0].geometry is None and pages[1].geometry is not None
    assert len(warnings) == 1 and ":3:" in warnings[0]


def test_clean_to_stdout_keeps_page_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(_jsonl(tmp_path)), "--table-format", "markdown", "--counters"]) == 0
    out, err = capsys.readouterr()
    assert (
        out == "# Report\n\n----- Page 2 -----\n\n\n\n----- Page 3 -----\n\n| a | b |\n|---|---|\n| 1 |  |\n"
    )
    assert json.loads(err.strip().splitlines()[-1])["placeholder_cells_pruned"] == 1


def test_grounded_to_file_with_regions(tmp_path: Path) -> None:
    out, regions = tmp_path / "out" / "doc.md", tmp_path / "doc.regions.jsonl"
    assert main([str(_jsonl(tmp_path)), "--mode", "grounded", "-o", str(out), "--regions", str(regions)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<|ref|>title<|/ref|><|det|>[[10, 10, 900, 60]]<|/det|>\n# Report\n")
    recs = [json.loads(line) for line in regions.read_text(encoding="utf-8").splitlines()]
    assert [(r["page"], r["label"]) for r in recs] == [(1, "title"), (3, "table")]
    assert recs[1]["boxes_pt"] == [[5.01, 5.01, 450.45, 300.3]]
    assert not list(out.parent.glob(".*.tmp"))


def test_raw_txt_with_form_feeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("first <script>x</script>page\fsecond page", encoding="utf-8")
    assert main([str(raw)]) == 0
    assert capsys.readouterr().out == "first page\n\n----- Page 2 -----\n\nsecond page\n"


def test_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_python_dash_m(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nhello", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "postprocess", str(raw), "--mode", "clean"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "hello\n"
