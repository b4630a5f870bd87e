"""Post-processing stage: one page of raw model output -> Markdown (clean or grounded mode).

In: raw engine text, ``CleanOptions``, optional ``PageGeometry`` and a ``figure_link`` callback
(the runner saves figure crops and returns their relative links). Out: ``PageCleanResult``.
Steps: (1) count and strip special tokens and a prompt echo, (2) parse regions, (3) cut repeated
regions, (4) per region: repair tables, cut loops and LaTeX spam, canonical Markdown pass (clean
mode), sanitize, (5) render in reading order. Never raises: an internal error falls back to the
sanitized plain text of the page and is reported in ``problems``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from postprocess import markdown as md
from postprocess.degenerate import cut_char_runs, cut_line_runs
from postprocess.grounding import ANY_GROUNDING_TAG_RE, parse_grounding
from postprocess.records import Box, CleanOptions, PageCleanResult, PageGeometry, Region
from postprocess.sanitize import escape_residual_html, sanitize_markdown, unsafe_url
from postprocess.tables import TABLE_BLOCK_RE, clean_table
from postprocess.tokens import count_special_tokens, strip_prompt_echo, strip_special_tokens

FigureLink = Callable[[int, Box], "str | None"]
FIGURE_MARKER = "<!-- figure -->"
REPEATED_TEXT_MIN = 3  # identical consecutive blocks (different boxes) kept once from here on
DEFAULT_OPTIONS = CleanOptions()
MAX_RAW_CHARS = 1_000_000  # 8192 tokens are ~40 kB; anything far larger is not model output
_CENTER_RE = re.compile(r"<\s*(?:/\s*)?center\s*>", re.I)  # captions come wrapped in <center>
# Whole ``<|ref|>label<|/ref|><|det|>boxes<|/det|>`` heads, for the last-resort fallback only.
_BLOCK_HEAD_RE = re.compile(
    r"<[|\uff5c]ref[|\uff5c]>[^<\n]{0,48}<[|\uff5c]/ref[|\uff5c]>\s*(?:<[|\uff5c]det[|\uff5c]>[^<]{0,400}<[|\uff5c]/det[|\uff5c]>)?"
)
_LINK_UNSAFE_CHARS_RE = re.compile(r"[\s()<>\[\]]")


def _union(boxes: tuple[Box, ...]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _drop_repeats(regions: list[Region], counters: Counter[str]) -> list[Region]:
    """The same block (label, box, text) seen again is a loop; so is the same text 3+ times in a
    row under different boxes. Keep the first copy."""
    seen: set[tuple[str, tuple[Box, ...], str]] = set()
    unique: list[Region] = []
    for r in regions:
        key = (r.label, r.boxes, r.text.strip())
        if r.boxes and key in seen:
            counters["loops_cut"] += 1
            continue
        seen.add(key)
        unique.append(r)
    out: list[Region] = []
    i = 0
    while i < len(unique):
        j = i + 1
        key2 = (unique[i].label, unique[i].text.strip())
        while j < len(unique) and key2[1] and (unique[j].label, unique[j].text.strip()) == key2:
            j += 1
        if j - i >= REPEATED_TEXT_MIN:
            counters["loops_cut"] += j - i - 1
            out.append(unique[i])
        else:
            out.extend(unique[i:j])
        i = j
    return out


def _process_text(text: str, label: str, options: CleanOptions, counters: Counter[str]) -> str:
    """Loop cutting, LaTeX spam and (clean mode) the canonical Markdown pass on non-table text."""
    text, n = _CENTER_RE.subn("", text)
    counters["html_sanitized"] += n
    # LaTeX before loops: a runaway ``\begin{pmatrix}`` loop is dropped whole rather than
    # shortened into unbalanced maths.
    text, n = md.cut_latex_spam(text, is_equation=label.startswith("equation"))
    counters["latex_blocks_cut"] += n
    text, n = cut_line_runs(text)
    counters["loops_cut"] += n
    text, n = cut_char_runs(text)
    counters["loops_cut"] += n
    text, n = md.unwrap_fake_math(text)
    counters["fake_math_unwrapped"] += n
    if options.mode == "clean":
        if not label.startswith("equation"):
            text, n = md.dehyphenate(text)
            counters["dehyphenated"] += n
        text, n = md.citations_to_footnotes(text)
        counters["citations_to_footnotes"] += n
        text, n = md.normalise_headings(text, label)
        counters["headings_normalised"] += n
    return text


def _process_content(text: str, label: str, options: CleanOptions, counters: Counter[str]) -> str:
    parts: list[str] = []
    pos = 0
    for m in TABLE_BLOCK_RE.finditer(text):
        before = text[pos : m.start()]
        if before.strip():
            parts.append(_process_text(before, label, options, counters))
        rendered, stray, tc = clean_table(m.group(0), table_format=options.table_format)
        counters.update(tc)
        if rendered:
            parts.append(rendered)
        if stray:
            parts.append(_process_text("\n".join(stray), "text", options, counters))
        pos = m.end()
    rest = text[pos:]
    if rest.strip() or not parts:
        parts.append(_process_text(rest, label, options, counters))
    out = "\n\n".join(p.strip() for p in parts if p.strip())
    # Removing a tag can join ``<|r`` and ``ef|>`` into a token, and removing a token can join
    # ``<`` and ``script>``: repeat both until nothing changes (hostile input only).
    for _ in range(4):
        new = strip_special_tokens(out)
        if options.sanitize:
            new, n = sanitize_markdown(new)
            counters["html_sanitized"] += n
        if new == out:
            break
        out = new
    else:
        out = strip_special_tokens(out)
    return out.strip()


def _figure(
    index: int, region: Region, figure_link: FigureLink | None, counters: Counter[str], problems: list[str]
) -> str:
    counters["figures"] += 1
    if figure_link is None or not region.boxes_px:
        return FIGURE_MARKER
    link = figure_link(index, _union(region.boxes_px))
    if not link:
        return FIGURE_MARKER
    if "\n" in link or "\r" in link:
        problems.append(f"figure link refused: {link[:80]!r}")
        return FIGURE_MARKER
    if unsafe_url(link):
        link = "./" + link  # ``name:2020_assets/..`` is a path, not a scheme
    safe = _LINK_UNSAFE_CHARS_RE.sub(lambda m: f"%{ord(m.group(0)):02X}", link)
    counters["figures_linked"] += 1
    return f"![figure {index + 1}]({safe})"


def _format_boxes(boxes: tuple[Box, ...]) -> str:
    return "[" + ", ".join(f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]" for b in boxes) + "]"


def _render(
    regions: list[Region],
    options: CleanOptions,
    figure_link: FigureLink | None,
    counters: Counter[str],
    problems: list[str],
) -> tuple[str, tuple[Region, ...]]:
    blocks: list[str] = []
    cleaned: list[Region] = []
    figure_index = 0
    for r in regions:
        content = _process_content(r.text, r.label, options, counters) if r.text.strip() else ""
        cleaned.append(Region(r.label, r.boxes, r.boxes_px, r.boxes_pt, content, r.tagged))
        figure = ""
        if r.label == "image":
            figure = _figure(figure_index, r, figure_link, counters, problems)
            figure_index += 1
        if options.mode == "grounded":
            # The tag already says "image"; only a saved crop adds anything.
            body = "\n\n".join(x for x in (figure if figure != FIGURE_MARKER else "", content) if x)
            head = f"<|ref|>{r.label}<|/ref|><|det|>{_format_boxes(r.boxes)}<|/det|>"
            blocks.append(f"{head}\n{body}" if body else head)
            continue
        if figure:
            blocks.append(figure)
        if content:
            blocks.append(content)
    if options.mode == "clean":
        # A page of tiny image boxes would otherwise be a column of markers.
        squashed: list[str] = []
        for b in blocks:
            if b == FIGURE_MARKER and squashed and squashed[-1] == b:
                counters["loops_cut"] += 1
                continue
            squashed.append(b)
        blocks = squashed
    return "\n\n".join(blocks), tuple(cleaned)


def _final_guard(text: str, options: CleanOptions, counters: Counter[str]) -> str:
    """Invariants of the output whatever happened above: no special token in clean mode, no
    grounding tag other than the ones we wrote in grounded mode, no HTML outside the allowlist."""
    if options.mode == "clean":
        stripped = strip_special_tokens(text)
        if stripped != text:
            counters["special_tokens_removed"] += 1
            text = stripped
    if options.sanitize:
        text, n = escape_residual_html(text)
        counters["html_sanitized"] += n
    return md.collapse_blank_lines(text)


def clean_page(
    raw: str,
    *,
    options: CleanOptions = DEFAULT_OPTIONS,
    geometry: PageGeometry | None = None,
    figure_link: FigureLink | None = None,
) -> PageCleanResult:
    """Turn one page of raw model output into Markdown. Never raises."""
    counters: Counter[str] = Counter()
    problems: list[str] = []
    if not isinstance(raw, str):
        return PageCleanResult("", (), {}, (f"raw text is {type(raw).__name__}, not str",))
    if len(raw) > MAX_RAW_CHARS:
        problems.append(f"raw text of {len(raw)} characters cut to {MAX_RAW_CHARS}")
        raw = raw[:MAX_RAW_CHARS]
    try:
        grounding_tags = len(ANY_GROUNDING_TAG_RE.findall(raw))
        counters["special_tokens_removed"] += max(0, count_special_tokens(raw) - grounding_tags)
        text, echoed = strip_prompt_echo(raw)
        counters["prompt_echo_removed"] += int(echoed)
        regions, parse_problems = parse_grounding(text, geometry)
        problems.extend(parse_problems)
        counters["parse_problems"] += len(parse_problems)
        counters["regions"] += len(regions)
        regions = _drop_repeats(regions, counters)
        markdown, cleaned = _render(regions, options, figure_link, counters, problems)
        markdown = _final_guard(markdown, options, counters)
    except Exception as exc:  # the contract is "never raises": the page is kept
        problems.append(f"internal error {type(exc).__name__}: {exc}"[:300])
        counters["internal_errors"] += 1
        fallback = strip_special_tokens(ANY_GROUNDING_TAG_RE.sub("\n", _BLOCK_HEAD_RE.sub("\n", raw)))
        if options.sanitize:
            fallback, _ = sanitize_markdown(fallback)
        markdown, cleaned = md.collapse_blank_lines(fallback), ()
    return PageCleanResult(
        markdown=markdown,
        regions=cleaned,
        counters={k: v for k, v in sorted(counters.items()) if v},
        problems=tuple(problems),
    )
