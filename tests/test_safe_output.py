"""Hostile model output never reaches an output file as active markup, in either mode."""

from __future__ import annotations

import json

import pdfgen
import pytest
import regex

from runner.jsonsafe import safe_dumps

BAD = regex.compile(r"(?i)<\s*(script|style|iframe)|\bon[a-z]+\s*=|javascript\s*:")


@pytest.mark.parametrize("mode", ["clean", "grounded"])
def test_no_active_markup_in_any_output(tmp_path, run_fake, mode):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    code, out, _ = run_fake(src, "--mode", mode, hostile=True)
    assert code == 0
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.suffix == ".md" for f in files)
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert not BAD.search(text), (f.name, BAD.search(text))
    recs = [json.loads(x) for x in (out / "a.pages.jsonl").read_text().splitlines()]
    # the raw engine text is kept (escaped), so nothing is lost for re-cleaning
    assert "<script>alert('x')</script>" in recs[0]["raw_text"]
    assert "Page 1 heading" in (out / "a.md").read_text()


def test_safe_dumps_round_trips():
    obj = {"t": "<script>x</script> a&b javascript:alert(1) <img onerror=1> data:text/html", "k": [1, "=:"]}
    s = safe_dumps(obj)
    assert json.loads(s) == obj
    assert not BAD.search(s) and "<" not in s
