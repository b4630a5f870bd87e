#!/usr/bin/env python3
"""Fuzz the PDF open/render path (the render worker pool) with mutated PDFs for a fixed time.

    python tools/fuzz_pdf.py --seconds 60 [--seeds DIR] [--save-crashes tests/fixtures/fuzz_pdf]

Inputs are seed PDFs (generated ones plus ``--seeds``) mutated at random (seeded, repeatable with
``--seed``): byte flips, chunk
deletions and duplications, truncation, and splices of PDF keywords (``obj``, ``/Length``,
``stream``, ``xref``, huge numbers). Each input is opened and its first pages rendered through
``runner.render.RenderPool`` exactly as a run would. A finding is anything where the *parent*
raises, a task gets no result, or the pool stops answering; worker crashes and timeouts are the
expected, contained outcomes and are only counted. Findings are saved for regression tests.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEYWORDS = [
    b"obj",
    b"endobj",
    b"/Length 999999999",
    b"stream",
    b"endstream",
    b"xref",
    b"trailer",
    b"/Count -1",
    b"/Kids [1 0 R]",
    b"<<",
    b">>",
    b"[",
    b"]",
    b"99999999999999999999",
    b"/Filter /FlateDecode",
    b"/Type /Page",
    b"/MediaBox [0 0 1e9 1e9]",
    b"\x00" * 16,
    b"%%EOF",
]


def seed_pdfs() -> list[bytes]:
    import pymupdf

    seeds = []
    doc = pymupdf.open()
    for i in range(2):
        p = doc.new_page()
        p.insert_text((72, 72), f"Seed page {i}", fontsize=12)
        p.draw_rect(pymupdf.Rect(72, 100, 300, 200), color=(0, 0, 0), fill=(0.5, 0.5, 0.9))
    seeds.append(doc.tobytes())
    seeds.append(doc.tobytes(deflate=True, garbage=3))
    return seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seeds", help="folder of extra seed PDFs")
    ap.add_argument("--save-crashes", default="tests/fixtures/fuzz_pdf")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import random

    from runner.render import OpenTask, RenderPool, RenderTask

    seeds = seed_pdfs()
    if args.seeds:
        seeds += [p.read_bytes() for p in sorted(Path(args.seeds).glob("*.pdf"))]
    outcomes: Counter[str] = Counter()
    findings: list[tuple[bytes, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="fuzzpdf-"))
    pool = RenderPool(workers=2, render_timeout_s=10, open_timeout_s=10, mem_limit_mb=1024)
    pool.wait_ready()
    deadline = time.monotonic() + args.seconds
    counter = [0]

    rng = random.Random(args.seed)

    def random_ops() -> list[tuple[str, int, object]]:
        ops: list[tuple[str, int, object]] = []
        for _ in range(rng.randint(1, 8)):
            op = rng.choice(["flip", "flip", "del", "dup", "ins", "cut"])
            pos = rng.randrange(1 << 20)
            arg: object = {
                "flip": rng.randint(1, 255),
                "del": rng.randint(1, 200),
                "dup": rng.randint(1, 200),
                "ins": rng.choice(KEYWORDS),
                "cut": 0,
            }[op]
            ops.append((op, pos, arg))
        return ops

    def mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
        b = bytearray(data)
        for op, pos, arg in ops:
            if not b:
                break
            i = pos % len(b)
            if op == "flip":
                b[i] ^= arg
            elif op == "del":
                del b[i : i + arg]
            elif op == "dup":
                b[i:i] = b[i : i + arg]
            elif op == "ins":
                b[i:i] = arg
            elif op == "cut":
                del b[i:]
        return bytes(b)

    def run_one(data: bytes) -> None:
        counter[0] += 1
        path = tmp / f"f{counter[0]}.pdf"
        path.write_bytes(data)
        try:
            pool.submit(OpenTask(1, "f", str(path)))
            res = _wait(pool, 1)
            outcomes["open:" + res[0].kind] += 1
            if res[0].kind == "ok":
                n = min(2, int(res[0].payload["page_count"]))
                for i in range(n):
                    pool.submit(RenderTask(10 + i, "f", str(path), i, dpi=72, max_pixels=20_000_000))
                for r in _wait(pool, n):
                    outcomes["render:" + r.kind] += 1
        except Exception as e:  # a parent-side failure is exactly what we hunt for
            findings.append((data, f"{type(e).__name__}: {e}"))
        finally:
            path.unlink(missing_ok=True)

    try:
        while time.monotonic() < deadline:
            run_one(mutate(rng.choice(seeds), random_ops()))
    finally:
        pool.close()
    print(f"fuzzed {counter[0]} inputs in {args.seconds:g} s; worker restarts {pool.restarts}")
    for k, v in sorted(outcomes.items()):
        print(f"  {k}: {v}")
    if findings:
        out = Path(args.save_crashes)
        out.mkdir(parents=True, exist_ok=True)
        for data, why in findings:
            name = hashlib.sha1(data).hexdigest()[:12]
            (out / f"{name}.pdf").write_bytes(data)
            print(f"FINDING {name}: {why}")
        return 1
    print("no parent-side failure found")
    return 0


def _wait(pool: object, n: int, limit_s: float = 60) -> list:
    out: list = []
    t0 = time.monotonic()
    while len(out) < n:
        out.extend(pool.collect(timeout=0.1))  # type: ignore[attr-defined]
        if time.monotonic() - t0 > limit_s:
            raise TimeoutError("render pool stopped answering")
    return out


if __name__ == "__main__":
    sys.exit(main())
