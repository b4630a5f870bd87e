"""Summarise a py-spy ``--format raw`` (collapsed stacks) file: where a process's samples go.

Usage: python tools/pyspy_top.py FILE [--top N] [--thread SUBSTR]
Prints samples per thread, then the functions with the most inclusive and self samples.
Used on the GPU machine's engine-core samples (gpu_session.sh pyspy) to find the host time per
decode step.
"""

from __future__ import annotations

import argparse
import collections
import re


def parse(path: str) -> list[tuple[list[str], int]]:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = re.match(r"^(.*) (\d+)$", line)
            if m:
                rows.append((m.group(1).split(";"), int(m.group(2))))
    return rows


def summarise(rows: list[tuple[list[str], int]], top: int = 25, thread: str | None = None) -> str:
    threads: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in rows:
        head = frames[0] if frames else "?"
        threads[head] += n
        if thread and thread not in head:
            continue
        total += n
        for fr in set(frames[1:]):
            incl[fr] += n
        if len(frames) > 1:
            self_[frames[-1]] += n
    out = ["samples per thread:"] + [f"  {v:7d}  {k[:120]}" for k, v in threads.most_common(10)]
    out.append(f"\nfunctions (inclusive), of {total} samples:")
    out += [f"  {100 * v / max(total, 1):5.1f}%  {k[:150]}" for k, v in incl.most_common(top)]
    out.append("\nfunctions (self):")
    out += [f"  {100 * v / max(total, 1):5.1f}%  {k[:150]}" for k, v in self_.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--thread", default=None, help="only stacks whose thread frame contains this")
    a = ap.parse_args()
    print(summarise(parse(a.file), a.top, a.thread))


if __name__ == "__main__":
    main()
