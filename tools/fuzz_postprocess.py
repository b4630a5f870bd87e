#!/usr/bin/env python3
"""Fuzz the post-processor (grounding parser, degenerate detector, page cleaner) for a fixed time.

    .venv/bin/python tools/fuzz_postprocess.py --seconds 60            # both engines, half the time each
    .venv/bin/python tools/fuzz_postprocess.py --seconds 300 --engine mutate --seed 7

Engines:
- ``hypothesis``: a grammar of DeepSeek-OCR output pieces (grounding tags, boxes, tables, LaTeX,
  special tokens) mixed with hostile HTML/Markdown and random text.
- ``mutate``: byte-level and token-level mutations of the fixtures in ``tests/fixtures/raw/*.txt``
  (slices deleted, duplicated hundreds of times, swapped, truncated; pieces inserted).

Every input must satisfy: ``parse_grounding``, ``detect_degenerate`` and ``clean_page`` (clean,
grounded, markdown tables) return without raising; the output passes ``audit_markdown`` and, when
markdown-it-py is installed, ``rendered_html_problems``; one ``clean_page`` call on an input under
64 KiB takes less than ``--slow`` seconds (a slow regex is a denial of service on hostile input).
Each failing input is saved once per kind of failure (the shortest one seen) under ``--save-dir``
as ``<kind>_<hash>.txt``; ``tests/test_postprocess_fuzz_regressions.py`` replays that folder.
Exit status: 0 when nothing was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from postprocess import CleanOptions, clean_page, detect_degenerate, parse_grounding  # noqa: E402
from postprocess.audit import audit_markdown  # noqa: E402

PIECES = [
    "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<\uff5cref\uff5c>", "<\uff5c/det\uff5c>", "<|grounding|>",
    "<image>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|User|>", "<|Assistant|>", "<|", "|>", "<\uff5c",
    "\uff5c>", "[[", "]]", "[", "]", "(", ")", "((", "))", ", ", "12", "999", "-3", "1e9", "s ", "text",
    "title",
    "sub_title", "image", "table", "equation", "image_caption", "\n", "\n\n", " ", "-\n", "# ", "######## ",
    "<table>", "</table>", "<tr>", "</tr>", "<td>", "</td>", "<th>", "<thead>", "<tbody>", "<caption>",
    '<td rowspan="2">', "<td colspan=3>", '<td colspan="99999">', "None", "N/A", "-", "\u2014", "&lt;",
    "&amp;",
    "&#x61;", "&#106;", "&colon;", "&", "<", ">", "<script>", "</script>", "<img src=x onerror=alert(1)>",
    "<img src=x onerror=alert(1)", "<svg onload=alert(1)>", "javascript:", "jav\tascript:", "[x](", "](",
    "](javascript:alert(1))", "[r]: javascript:x\n", "<javascript:alert(1)>", "<a href=javascript:x>", "</a>",
    "<!--", "-->", "<![CDATA[", "<?", "<center>", "</center>", "<sup>", "</sup>", "<sup>71</sup>", "71",
    "\\[", "\\]", "\\(", "\\)", "$$", "$", "\\begin{pmatrix}", "\\overline{", "\\begin{tikzpicture}",
    "\\end{tikzpicture}", "<style>", "</style>", "<iframe>", "<br>", "<b>", "</b>", "<math>", "<mi>", "word",
    "state-of-the-", "art", "exam-", "ple", "well-", "known", "\u200b", "\x00", "\ufeff", "\\", "`", "```",
]  # fmt: skip
OPTIONS = (CleanOptions(), CleanOptions(mode="grounded"), CleanOptions(table_format="markdown"))


@dataclass
class Findings:
    save_dir: Path
    slow_s: float
    seen: dict[str, str] = field(default_factory=dict)  # kind -> shortest input
    files: dict[str, Path] = field(default_factory=dict)  # kind -> file written by this run
    runs: int = 0

    def check(self, raw: str) -> None:
        """Run every invariant on ``raw``; record (not raise) what fails."""
        self.runs += 1
        # A regex stuck in C cannot be interrupted: the input under test is on disk until it is
        # done, so a fuzzer killed by ``timeout`` leaves the hanging input behind.
        self.save_dir.mkdir(parents=True, exist_ok=True)
        current = self.save_dir / "in_progress.txt.partial"
        current.write_text(raw, encoding="utf-8", errors="surrogatepass")
        try:
            parse_grounding(raw)
            reason = detect_degenerate(raw)
            assert reason is None or isinstance(reason, str)
            for opt in OPTIONS:
                t0 = time.perf_counter()
                res = clean_page(raw, options=opt)
                took = time.perf_counter() - t0
                if took > self.slow_s and len(raw) < 65536:
                    self.record(f"slow_{opt.mode}", raw, f"{took:.2f}s for {len(raw)} chars")
                if res.counters.get("internal_errors"):
                    self.record(f"internal_{opt.mode}", raw, "; ".join(res.problems))
                bad = audit_markdown(res.markdown, mode=opt.mode)
                if bad:
                    self.record(f"audit_{opt.mode}", raw, "; ".join(bad) + "\n---\n" + res.markdown[:2000])
                bad = _rendered(res.markdown)
                if bad:
                    self.record(f"rendered_{opt.mode}", raw, "; ".join(bad) + "\n---\n" + res.markdown[:2000])
        except Exception as exc:  # the point of a fuzzer: keep going and report
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.record(f"raise_{type(exc).__name__}_{Path(where.filename).stem}_{where.lineno}", raw,
                        traceback.format_exc())  # fmt: skip
        current.unlink(missing_ok=True)

    def record(self, kind: str, raw: str, detail: str) -> None:
        old = self.seen.get(kind)
        if old is not None and len(old) <= len(raw):
            return
        self.seen[kind] = raw
        self.save_dir.mkdir(parents=True, exist_ok=True)
        stale = self.files.pop(kind, None)
        if stale is not None:  # only a file this run wrote: earlier findings are regression tests
            stale.unlink(missing_ok=True)
        digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        path = self.save_dir / f"{kind}_{digest}.txt"
        path.write_text(raw, encoding="utf-8", errors="surrogatepass")
        self.files[kind] = path
        print(
            f"[finding] {kind} ({len(raw)} chars): {detail.splitlines()[0][:200] if detail else ''}",
            flush=True,
        )


def _rendered(markdown: str) -> list[str]:
    try:
        from postprocess.audit import rendered_html_problems

        return rendered_html_problems(markdown)
    except ImportError:
        return []


def mutate(rng: random.Random, seeds: list[str]) -> str:
    s = rng.choice(seeds)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(9)
        n = len(s)
        i, j = sorted((rng.randint(0, n), rng.randint(0, n)))
        if op == 0:
            s = s[:i] + s[j:]
        elif op == 1:
            s = s[:j] + s[i:j] * rng.choice((2, 5, 50, 300)) + s[j:]
        elif op == 2:
            s = s[:i] + rng.choice(PIECES) * rng.choice((1, 1, 1, 3, 40, 2000)) + s[i:]
        elif op == 3:
            s = s[:i] + s[j:] + s[i:j]
        elif op == 4:
            s = s[: rng.randint(0, n)]
        elif op == 5 and n:
            k = rng.randrange(n)
            s = (
                s[:k]
                + chr(rng.choice((rng.randint(0, 0x7F), rng.randint(0, 0x2FFF), 0xFF5C, 0x2581)))
                + s[k + 1 :]
            )
        elif op == 7:
            # Long runs of one character inside any context: how super-linear regexes were found.
            s = s[:i] + rng.choice(" \t\na1-#<|\\[(.*_") * rng.choice((300, 3000, 20000)) + s[i:]
        elif op == 6:
            s = s[:i] + rng.choice(seeds)[: rng.randint(0, 400)] + s[i:]
        else:
            s = s.replace(rng.choice(PIECES), rng.choice(PIECES))
    return s[:200_000]


def run_mutate(findings: Findings, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    seeds = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "tests/fixtures/raw").glob("*.txt"))]
    seeds = seeds or ["<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nseed"]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        findings.check(mutate(rng, seeds))


def run_hypothesis(findings: Findings, seconds: float, seed: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    soup = st.lists(
        st.one_of(
            st.sampled_from(PIECES), st.text(max_size=12), st.sampled_from(PIECES).map(lambda p: p * 300)
        ),
        max_size=120,
    ).map("".join)
    end = time.monotonic() + seconds
    round_no = 0
    while time.monotonic() < end:
        round_no += 1

        @hseed(seed + round_no)
        @settings(max_examples=100, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])  # fmt: skip
        @given(soup)
        def prop(raw: str) -> None:
            if time.monotonic() < end:
                findings.check(raw)

        prop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="total fuzzing time")
    ap.add_argument("--engine", choices=("both", "hypothesis", "mutate"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow", type=float, default=2.0, help="seconds one clean_page may take")
    ap.add_argument("--save-dir", type=Path, default=ROOT / "tests/fixtures/raw/fuzz")
    args = ap.parse_args(argv)
    findings = Findings(args.save_dir, args.slow)
    t0 = time.monotonic()
    if args.engine in ("both", "hypothesis"):
        run_hypothesis(findings, args.seconds / (2 if args.engine == "both" else 1), args.seed)
    if args.engine in ("both", "mutate"):
        run_mutate(findings, args.seconds - (time.monotonic() - t0), args.seed)
    took = time.monotonic() - t0
    kinds = sorted(findings.seen)
    print(f"{findings.runs} inputs in {took:.0f}s, {len(kinds)} finding kind(s): {kinds}")
    return 1 if findings.seen else 0


if __name__ == "__main__":
    sys.exit(main())
