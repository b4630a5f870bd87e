"""Replays every input the fuzzer (tools/fuzz_postprocess.py) saved under tests/fixtures/raw/fuzz/.

Each file once crashed, leaked a token or tag, or was too slow; all must now pass every invariant.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from postprocess import CleanOptions, clean_page, detect_degenerate, parse_grounding
from postprocess.audit import audit_markdown, rendered_html_problems

FUZZ = sorted((Path(__file__).parent / "fixtures" / "raw" / "fuzz").glob("*.txt"))
# Measured well under 0.1 s each after the fixes; the bound only catches a super-linear regression.
SLOW_S = 3.0


@pytest.mark.parametrize("path", FUZZ, ids=[p.stem for p in FUZZ])
def test_fuzz_regression(path: Path) -> None:
    raw = path.read_text(encoding="utf-8", errors="surrogatepass")
    parse_grounding(raw)
    reason = detect_degenerate(raw)
    assert reason is None or isinstance(reason, str)
    for options in (CleanOptions(), CleanOptions(mode="grounded"), CleanOptions(table_format="markdown")):
        t0 = time.perf_counter()
        res = clean_page(raw, options=options)
        assert time.perf_counter() - t0 < SLOW_S
        assert "internal_errors" not in res.counters, res.problems
        assert audit_markdown(res.markdown, mode=options.mode) == []
        assert rendered_html_problems(res.markdown) == []
