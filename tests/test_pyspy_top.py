"""tools/pyspy_top.py: py-spy's collapsed stacks summed per thread and per function."""

from __future__ import annotations

from pathlib import Path

from tools.pyspy_top import parse, summarise


def test_summary_counts_inclusive_and_self_samples(tmp_path: Path) -> None:
    f = tmp_path / "raw.txt"
    f.write_text(
        'process 1:"MainThread";run (a.py:1);step (b.py:2);schedule (s.py:3) 30\n'
        'process 1:"MainThread";run (a.py:1);step (b.py:2);sample (s.py:9) 10\n'
        'process 1:"out";send (z.py:1) 5\n'
        "garbage line without a count\n"
    )
    rows = parse(str(f))
    assert len(rows) == 3
    text = summarise(rows, top=5)
    assert "88.9%  step (b.py:2)" in text and "66.7%  schedule (s.py:3)" in text
    only_main = summarise(rows, top=5, thread="MainThread")
    assert "of 40 samples" in only_main and "75.0%  schedule (s.py:3)" in only_main
