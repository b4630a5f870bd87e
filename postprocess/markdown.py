"""Post-processing stage: the canonical Markdown pass and page joining.

In: Markdown text of one page (tables already rendered, HTML not yet sanitized). Out: the same
text with blank-line runs collapsed, words wrapped at line ends re-joined (real compounds kept),
numeric superscript citations turned into footnote references, heading markers normalised,
spammy LaTeX/TikZ replaced by a marker, and literal ``\\[ 1995 \\]`` brackets unwrapped.
``join_pages`` builds the document from pages.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence

LATEX_MARKER = "<!-- latex omitted -->"
LATEX_SPAM_CHARS = 2000
LATEX_REPETITIVE_CHARS = 400
LATEX_REPETITIVE_RATIO = 6.0
# Prefixes that form real hyphenated compounds; a line-end hyphen after them is kept.
COMPOUND_PREFIXES = frozenset(
    {
        "well",
        "self",
        "ill",
        "non",
        "half",
        "cross",
        "all",
        "ex",
        "so",
        "long",
        "short",
        "high",
        "low",
        "full",
        "part",
        "first",
        "second",
        "third",
        "two",
        "three",
        "four",
        "five",
        "one",
        "state",
        "end",
        "user",
        "real",
        "open",
        "closed",
        "fine",
        "large",
        "small",
        "data",
        "time",
        "web",
        "peer",
        "co",
        "anti",
        "post",
        "pre",
        "multi",
        "inter",
        "intra",
        "meta",
        "quasi",
        "semi",
        "pseudo",
        "over",
        "under",
        "top",
        "bottom",
        "left",
        "right",
        "re",
    }
)

_HEADING_NOSPACE_RE = re.compile(r"^(#{1,6})(?=[^\s#])")
# Whitespace is matched in one place only between tokens: ``\s*\]?\s*`` was quadratic on long runs.
_SUP_CITE_RE = re.compile(
    r"<sup>\s*(?:\[\s*)?(\d{1,4}(?:\s*[,\u2013\-]\s*\d{1,4})*)\s*(?:\]\s*)?</sup>", re.I
)
_LATEX_CITE_RE = re.compile(r"(?:\\\(|\$)\s*\^\s*\{\s*(\d{1,4}(?:\s*[,\-]\s*\d{1,4})*)\s*\}\s*(?:\\\)|\$)")
_FAKE_MATH_RE = re.compile(r"\\\[([\d\s,.\-\u2013]{1,80})\\\]")
_MATH_BLOCK_RE = re.compile(r"\\\[.*?(?:\\\]|\Z)|\$\$.*?(?:\$\$|\Z)", re.S)
_TIKZ_RE = re.compile(r"\\begin\{tikzpicture\}.*?(?:\\end\{tikzpicture\}|\Z)", re.S)
_TABLE_SEG_RE = re.compile(r"<table>.*?</table>", re.S)
# Applied to the last whitespace-separated token of a line only, and only to tokens up to
# MAX_WRAP_TOKEN characters: a regex over a whole 30 kB line was cubic (found by the fuzzer).
_WRAP_RE = re.compile(r"(.*?)([A-Za-z]+)-")
MAX_WRAP_TOKEN = 64
_NEXT_WORD_RE = re.compile(r"^[ \t]*([A-Za-z0-9]+)(\S*)[ \t]*")


def collapse_blank_lines(text: str) -> str:
    """Strip trailing spaces on every line and leave at most one blank line between blocks."""
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def dehyphenate(text: str) -> tuple[str, int]:
    """Re-join words wrapped at a line end (``exam-\\nple`` -> ``example``). The hyphen is kept
    (and the lines still joined) for compounds: a token that already has a hyphen
    (``state-of-the-\\nart``), a known compound prefix (``well-\\nknown``), a capital or digit
    after the break, or a hyphenated form used elsewhere on the page."""
    lines = text.split("\n")
    lower = text.lower()
    joined = 0
    i = 0
    while i < len(lines) - 1:
        line = lines[i]
        start = max(line.rfind(" "), line.rfind("\t")) + 1
        m = (
            _WRAP_RE.fullmatch(line, start)
            if line.endswith("-") and len(line) - start <= MAX_WRAP_TOKEN
            else None
        )
        nxt = _NEXT_WORD_RE.match(lines[i + 1][: MAX_WRAP_TOKEN * 4]) if m is not None else None
        if m is None or nxt is None:
            i += 1
            continue
        lead, head = m.group(1), m.group(2)
        tail, trailing = nxt.group(1), nxt.group(2)
        compound = (
            "-" in lead
            or bool(lead and not lead[-1].isalpha() and lead[-1] not in "([\"'")
            or len(head) < 2
            or head.lower() in COMPOUND_PREFIXES
            or not tail[0].islower()
            or (f"{head}-{tail}".lower() in lower and f"{head}{tail}".lower() not in lower)
        )
        if compound:
            word = f"{lead}{head}-{tail}{trailing}"
        else:
            word = f"{lead}{head}{tail}{trailing}"
            joined += 1
        lines[i] = lines[i][: m.start()] + word
        rest = lines[i + 1][nxt.end() :]  # nxt matched a prefix of the line
        if rest.strip():
            lines[i + 1] = rest
            i += 1
        else:
            del lines[i + 1]
    return "\n".join(lines), joined


def _expand(nums: str) -> list[str]:
    out: list[str] = []
    for part in re.split(r"\s*,\s*", nums.strip()):
        rng = re.split(r"\s*[\u2013\-]\s*", part)
        if len(rng) == 2 and rng[0].isdigit() and rng[1].isdigit() and 0 < int(rng[1]) - int(rng[0]) <= 20:
            out.extend(str(k) for k in range(int(rng[0]), int(rng[1]) + 1))
        elif part.isdigit():
            out.append(part)
    return out


def _looks_like_citation(text: str, start: int) -> bool:
    """``cancer<sup>71</sup>`` is a citation; ``m<sup>2</sup>`` and ``10<sup>5</sup>`` are not."""
    before = text[max(0, start - 40) : start]
    if not before or before[-1].isdigit() or before[-1].isspace():
        return False
    if before[-1] in ".,;:)]\"'\u201d":
        return True
    word = re.search(r"([A-Za-z]+)$", before)
    return word is not None and len(word.group(1)) >= 4


def citations_to_footnotes(text: str) -> tuple[str, int]:
    """``<sup>71</sup>`` -> ``[^71]``, ``<sup>3,5-7</sup>`` -> ``[^3][^5][^6][^7]`` (also the LaTeX
    form ``\\(^{71}\\)``), outside HTML tables and only where the superscript follows a word or
    punctuation (units and powers stay superscripts)."""
    count = 0

    def repl(m: re.Match[str], seg: str) -> str:
        nonlocal count
        nums = _expand(m.group(1))
        if not nums or not _looks_like_citation(seg, m.start()):
            return m.group(0)
        count += 1
        return "".join(f"[^{n}]" for n in nums)

    def one(seg: str) -> str:
        seg = _SUP_CITE_RE.sub(lambda m: repl(m, seg), seg)
        return _LATEX_CITE_RE.sub(lambda m: repl(m, seg), seg)

    return _outside_tables(text, one), count


def _outside_tables(text: str, fn: Callable[[str], str]) -> str:
    parts: list[str] = []
    pos = 0
    for m in _TABLE_SEG_RE.finditer(text):
        parts.append(fn(text[pos : m.start()]))
        parts.append(m.group(0))
        pos = m.end()
    parts.append(fn(text[pos:]))
    return "".join(parts)


def _parse_heading(line: str) -> tuple[int, str] | None:
    """ATX heading ``## body ##`` -> (level, body), or None. Plain string work: the regex
    ``(.*?)[ \t]*#*[ \t]*$`` was cubic on a heading with a long run of spaces (found by the fuzzer)."""
    if not line.startswith("#"):
        return None
    rest = line.lstrip("#")
    if rest and rest[0] not in " \t":
        return None
    body = rest.strip(" \t")
    closing = body.rstrip("#")
    if closing != body and (not closing or closing[-1] in " \t"):
        body = closing.rstrip(" \t")
    return len(line) - len(rest), body


def normalise_headings(text: str, label: str) -> tuple[str, int]:
    """Heading markers: ``#Title`` -> ``# Title``, levels capped at 6, empty headings removed;
    a ``title`` block is a level-1 heading and a ``sub_title`` block at least level 2."""
    changed = 0
    if label in ("title", "sub_title"):
        one_line = " ".join(text.split())
        if one_line and not one_line.startswith("<"):
            m = re.match(r"^(#*)\s*(.*)$", one_line)
            level_in = len(m.group(1)) if m else 0
            body = m.group(2) if m else one_line
            level = 1 if label == "title" else min(6, max(2, level_in))
            new = f"{'#' * level} {body}" if body else ""
            changed += new != text
            return new, changed
    out = []
    for line in text.split("\n"):
        fixed = _HEADING_NOSPACE_RE.sub(r"\1 ", line) if label in ("title", "sub_title") else line
        heading = _parse_heading(fixed)
        if heading is not None:
            level, body = heading
            fixed = f"{'#' * min(6, level)} {body}" if body else ""
        changed += fixed != line
        out.append(fixed)
    return "\n".join(out), changed


def _repetitive(s: str) -> bool:
    data = s.encode("utf-8", "replace")
    return len(data) >= LATEX_REPETITIVE_CHARS and len(data) / max(1, len(zlib.compress(data))) >= (
        LATEX_REPETITIVE_RATIO
    )


def cut_latex_spam(text: str, *, is_equation: bool = False) -> tuple[str, int]:
    """Replace TikZ pictures and runaway maths (too long, or highly repetitive) by a marker."""
    cuts = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal cuts
        s = m.group(0)
        if s.startswith("\\begin{tikzpicture}") or len(s) >= LATEX_SPAM_CHARS or _repetitive(s):
            cuts += 1
            return LATEX_MARKER
        return s

    text = _TIKZ_RE.sub(repl, text)
    text = _MATH_BLOCK_RE.sub(repl, text)
    if is_equation and text.strip() != LATEX_MARKER and (len(text) >= LATEX_SPAM_CHARS or _repetitive(text)):
        cuts += 1
        text = LATEX_MARKER
    return text, cuts


def unwrap_fake_math(text: str) -> tuple[str, int]:
    """``\\[ 1995 \\]`` / ``\\[ 3, 4 \\]`` are literal brackets the model wrote as display maths."""
    n = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal n
        if not any(c.isdigit() for c in m.group(1)):
            return m.group(0)
        n += 1
        return f"[{' '.join(m.group(1).split())}]"

    return _FAKE_MATH_RE.sub(repl, text), n


def join_pages(pages: Sequence[str]) -> str:
    """Join page Markdown in order with a ``----- Page N -----`` line before page N from page 2
    on, a blank line around it, and one trailing newline."""
    if not pages:
        return ""
    parts = [pages[0].strip("\n")]
    for n, page in enumerate(pages[1:], start=2):
        parts.append(f"\n\n----- Page {n} -----\n\n{page.strip(chr(10))}")
    return "".join(parts).rstrip("\n") + "\n"
