"""Post-processing stage: degenerate-output detection and loop cutting.

In: raw engine text (for ``detect_degenerate``) or one block's text (for the cutters).
Out: a reason string used by the runner's retry policy (recorded on the page record), or the
text with runaway repeats shortened plus how many cuts were made. Thresholds are deliberately
conservative: a false "degenerate" costs a retry, a missed loop costs a page of garbage.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

from postprocess.grounding import DET_CLOSE_RE, DET_OPEN_RE, REF_CLOSE_RE, REF_OPEN_RE, parse_grounding
from postprocess.tokens import PARTIAL_TOKEN_RE, has_eos, strip_eos

# A unit of 1-16 characters repeated at least CHAR_RUN_REPEATS times in a row, spanning at least
# CHAR_RUN_MIN_CHARS characters (``overline[[`` loops, endless ``1 1 1``). Dot leaders in a table
# of contents stay below these numbers.
CHAR_RUN_REPEATS = 30
CHAR_RUN_MIN_CHARS = 200
_CHAR_RUN_RE = re.compile(r"(.{1,16}?)\1{" + str(CHAR_RUN_REPEATS - 1) + ",}", re.S)
# Cutting in clean output uses a lower bar than detection (a 100-dot leader is still noise).
_CUT_RUN_RE = re.compile(r"(.{1,16}?)\1{15,}", re.S)
CUT_RUN_MIN_CHARS = 80
KEEP_REPEATS = 3

MAX_RAW_CHARS = 1_000_000
LINE_RUN_MIN = 20  # identical consecutive non-empty lines ("29 lines of 1")
LINE_CUT_MIN = 6  # identical consecutive lines cut in clean output
BLOCK_PERIOD_MAX = 40  # lines in one repeated multi-line block
BLOCK_REPEATS_MIN = 5  # repeats of a multi-line block cut in clean output
# Detection is stricter than cutting: a false "degenerate" costs retries and may fail a real page
# (forms repeat "Signature: ____ / Date: ____" a few times); real loops repeat 100+ times.
BLOCK_REPEATS_DETECT = 8
TAIL_CHARS = 4000  # a loop runs to max_tokens, so the end of a looping output is periodic
TAIL_PERIOD_MAX = 800
TAIL_REPEATS_MIN = 8
TAIL_MIN_CHARS = 2000  # short pages (a form repeating two fields) are never judged by their tail
REPEATED_BOX_MIN = 6  # the same block (label, box, text) this many times
REPEATED_BOX_ANY_TEXT_MIN = 20  # the same label+box this many times, whatever the text
TINY_IMAGE_BOXES_MIN = 50  # "a newspaper page as 137 tiny image boxes"
TINY_AREA = 0.01  # fraction of the page
LATEX_LOOP_CHARS = 3000
# 30+ identical table rows in a row (the n-gram guard exempts ``<td>``/``<tr>`` tokens).
ROW_LOOP_MIN = 30
_TR_SPLIT_RE = re.compile(r"<tr\b", re.I)
_TABLE_RE = re.compile(r"<table\b.*?(?:</table>|\Z)", re.S | re.I)


def _char_run(text: str) -> bool:
    for m in _CHAR_RUN_RE.finditer(text):
        if len(m.group(0)) >= CHAR_RUN_MIN_CHARS and m.group(1).strip():
            return True
    return False


def _line_run(lines: list[str]) -> bool:
    run, prev = 0, None
    for line in lines:
        s = line.strip()
        if not s:
            continue
        run = run + 1 if s == prev else 1
        prev = s
        if run >= LINE_RUN_MIN:
            return True
    return False


def _repeated_block(lines: list[str]) -> bool:
    """A block of 2..BLOCK_PERIOD_MAX non-empty lines repeated BLOCK_REPEATS_DETECT+ times in a row."""
    lines = [s.strip() for s in lines if s.strip()]
    n = len(lines)
    for period in range(2, BLOCK_PERIOD_MAX + 1):
        if period * BLOCK_REPEATS_DETECT > n:
            break
        run = 0
        for i in range(period, n):
            run = run + 1 if lines[i] == lines[i - period] else 0
            if run >= period * (BLOCK_REPEATS_DETECT - 1):
                return True
    return False


def _repeated_rows(raw: str) -> bool:
    if "<tr" not in raw.lower():
        return False
    run, prev = 0, None
    for row in _TR_SPLIT_RE.split(raw)[1:]:
        s = row.strip()
        run = run + 1 if s == prev else 1
        prev = s
        if run >= ROW_LOOP_MIN:
            return True
    return False


def _cut_mid_tag(raw: str) -> bool:
    tail = raw.rstrip()
    if PARTIAL_TOKEN_RE.search(tail):
        return True
    last_ref = max(REF_OPEN_RE.finditer(tail), key=lambda m: m.start(), default=None)
    if last_ref is not None:
        after = tail[last_ref.end() :]
        if not REF_CLOSE_RE.search(after) and not DET_OPEN_RE.search(after):
            return len(after) <= 48
    last_det = max(DET_OPEN_RE.finditer(tail), key=lambda m: m.start(), default=None)
    if last_det is not None and not DET_CLOSE_RE.search(tail[last_det.end() :]):
        return True
    # An HTML table cut off mid-way at the very end.
    low = tail.lower()
    return low.rfind("<table") > low.rfind("</table>") and len(tail) - low.rfind("<table") < 20000


def _periodic_tail(raw: str) -> bool:
    """The last TAIL_CHARS characters are one unit of at most TAIL_PERIOD_MAX characters repeated
    TAIL_REPEATS_MIN+ times (catches loops with long units, e.g. a sentence or a 17-character
    ``\\end{tikzpicture}``). Smallest period from the KMP prefix function: O(n)."""
    tail = raw.rstrip()[-TAIL_CHARS:]
    n = len(tail)
    if n < TAIL_MIN_CHARS:
        return False
    pi = [0] * n
    for i in range(1, n):
        k = pi[i - 1]
        while k and tail[i] != tail[k]:
            k = pi[k - 1]
        if tail[i] == tail[k]:
            k += 1
        pi[i] = k
    period = n - pi[-1]
    return period <= TAIL_PERIOD_MAX and n >= TAIL_REPEATS_MIN * period and bool(tail[:period].strip())


def detect_degenerate(raw: str, *, stopped_by_eos: bool | None = None) -> str | None:
    """Say why a page's raw output looks like a loop or a truncation, or None when it looks fine.

    Reasons: ``repeated_box``, ``tiny_image_boxes``, ``repeated_block``, ``line_run``, ``char_run``,
    ``repeated_rows``, ``repeated_tail``, ``latex_loop``, ``cut_mid_tag``, ``no_eos`` (the engine
    says it did not stop on EOS and nothing more specific was found), ``too_long``, ``not_text``.
    Empty output is not degenerate (blank pages). Never raises.
    """
    if not isinstance(raw, str):
        return "not_text"
    if len(raw) > MAX_RAW_CHARS:
        return "too_long"
    regions, _ = parse_grounding(raw)
    tagged = [r for r in regions if r.tagged and r.boxes]
    blocks = Counter((r.label, r.boxes, r.text.strip()) for r in tagged)
    boxes = Counter((r.label, r.boxes) for r in tagged)
    if blocks and blocks.most_common(1)[0][1] >= REPEATED_BOX_MIN:
        return "repeated_box"
    if boxes and boxes.most_common(1)[0][1] >= REPEATED_BOX_ANY_TEXT_MIN:
        return "repeated_box"
    tiny = [
        r
        for r in tagged
        if r.label == "image" and all((b[2] - b[0]) * (b[3] - b[1]) < TINY_AREA * 999 * 999 for b in r.boxes)
    ]
    if len(tiny) >= TINY_IMAGE_BOXES_MIN:
        return "tiny_image_boxes"
    texts = [r.text.strip() for r in regions if r.text.strip()]
    if len(texts) >= BLOCK_REPEATS_DETECT:
        run = 1
        for a, b in itertools.pairwise(texts):
            run = run + 1 if a == b and len(a) >= 8 else 1
            if run >= BLOCK_REPEATS_DETECT:
                return "repeated_block"
    lines = raw.splitlines()
    if _line_run(lines):
        return "line_run"
    if _repeated_block(lines):
        return "repeated_block"
    if _char_run(raw):
        return "char_run"
    if _repeated_rows(raw):
        return "repeated_rows"
    for r in regions:
        if r.label.startswith("equation") and len(r.text) >= LATEX_LOOP_CHARS:
            return "latex_loop"
    if _periodic_tail(strip_eos(raw)):
        return "repeated_tail"
    eos = has_eos(raw)
    if not eos and _cut_mid_tag(raw):
        return "cut_mid_tag"
    if stopped_by_eos is False and not eos:
        return "no_eos"
    return None


def cut_char_runs(text: str) -> tuple[str, int]:
    """Shorten runs of a short repeated unit to KEEP_REPEATS copies. Whitespace runs are left to
    the Markdown pass."""
    cuts = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal cuts
        unit = m.group(1)
        if len(m.group(0)) < CUT_RUN_MIN_CHARS or not unit.strip():
            return m.group(0)
        cuts += 1
        return unit * KEEP_REPEATS

    out = _CUT_RUN_RE.sub(repl, text)
    return out, cuts


def _has_period(lines: list[str], period: int) -> bool:
    """Some stretch of ``period * (BLOCK_REPEATS_MIN - 1)`` lines equals the lines ``period``
    later (a cheap O(n) test before the rewriting pass)."""
    run = 0
    for i in range(period, len(lines)):
        run = run + 1 if lines[i] == lines[i - period] else 0
        if run >= period * (BLOCK_REPEATS_MIN - 1):
            return True
    return False


def cut_line_runs(text: str) -> tuple[str, int]:
    """Collapse LINE_CUT_MIN+ identical consecutive lines, and multi-line blocks repeated
    BLOCK_REPEATS_MIN+ times in a row, to one copy."""
    lines = text.split("\n")
    cuts = 0
    out: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j + 1 < len(lines) and lines[j + 1].strip() == lines[i].strip():
            j += 1
        if lines[i].strip() and j - i + 1 >= LINE_CUT_MIN:
            cuts += 1
            out.append(lines[i])
        elif not lines[i].strip() and j - i + 1 > 2:
            out.extend(("", ""))  # Markdown renders 3+ blank lines as one paragraph break anyway
        else:
            out.extend(lines[i : j + 1])
        i = j + 1
    lines = out
    for period in range(2, BLOCK_PERIOD_MAX + 1):
        if period * BLOCK_REPEATS_MIN > len(lines):
            break
        if not _has_period(lines, period):
            continue
        i = 0
        kept: list[str] = []
        while i < len(lines):
            reps = 1
            while (
                i + (reps + 1) * period <= len(lines)
                and lines[i] == lines[i + reps * period]
                and lines[i : i + period] == lines[i + reps * period : i + (reps + 1) * period]
            ):
                reps += 1
            if reps >= BLOCK_REPEATS_MIN:
                block = lines[i : i + period]
                if any(s.strip() for s in block):
                    cuts += 1
                    kept.extend(block)
                else:  # blank lines repeat trivially; the Markdown pass collapses them
                    kept.extend(lines[i : i + reps * period])
                # Jump past the whole run either way: stepping one line at a time through a long
                # run was quadratic (found by the fuzzer with thousands of blank lines).
                i += reps * period
            else:
                kept.append(lines[i])
                i += 1
        lines = kept
    return "\n".join(lines), cuts
