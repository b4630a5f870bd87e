"""Post-processing stage: the grounding parser (raw grounded output -> typed regions).

In: raw text made of blocks ``<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`` followed
by content, with every malformation listed in OUTPUT_FORMAT.md (missing closing tags, spaces and
newlines inside tags, broken or non-numeric boxes, a ``<|det|>`` never closed, cut-offs).
Out: ``Region`` records in reading order plus a list of problems. The parser never raises and
never drops content text: whatever cannot be read as a label or a box ends up in a region's text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from postprocess.records import Box, PageGeometry, Region
from postprocess.tokens import strip_prompt_echo, strip_special_tokens

_BAR = "[|\uff5c]"
REF_OPEN_RE = re.compile(rf"<{_BAR}\s*ref\s*{_BAR}>", re.I)
REF_CLOSE_RE = re.compile(rf"<{_BAR}\s*/\s*ref\s*{_BAR}>", re.I)
DET_OPEN_RE = re.compile(rf"<{_BAR}\s*det\s*{_BAR}>", re.I)
DET_CLOSE_RE = re.compile(rf"<{_BAR}\s*/\s*det\s*{_BAR}>", re.I)
ANY_GROUNDING_TAG_RE = re.compile(rf"<{_BAR}\s*(?:/\s*)?(?:ref|det)\s*{_BAR}>", re.I)

KNOWN_LABELS = (
    "title",
    "sub_title",
    "text",
    "equation",
    "table",
    "image",
    "image_caption",
    "table_caption",
    "table_footnote",
    "image_footnote",
    "text_begin",
    "equation group",
    "text_caption",
    "text of text",
)
MAX_LABEL_CHARS = 48
UNTAGGED_LABEL = "text"
_LABEL_CLEAN_RE = re.compile(r"[^a-z0-9_ ]+")
# Labels without ``<|/ref|>``: the longest known label that starts the text, as a whole word.
_KNOWN_PREFIX_RE = re.compile(
    r"\A\s*("
    + "|".join(re.escape(x) for x in sorted(KNOWN_LABELS, key=len, reverse=True))
    + r")(?![a-z0-9_])",
    re.I,
)
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")
_GROUP_RE = re.compile(r"[\[(]([^\[\]()]*)[\])]")
# Boxes written without ``<|det|>`` (``[[1, 2, 3, 4]]`` or several) right after the label, and a
# complete ``<|det|>..<|/det|>`` span (bounded, box characters only) found inside content.
_BARE_BOXES_RE = re.compile(
    r"(\[\[[\d\s,.\-]{1,80}\](?:\s*,\s*\[[\d\s,.\-]{1,80}\]){0,63}\])(?:\s*<[|\uff5c]/det[|\uff5c]>)?"
)
_DET_SPAN_RE = re.compile(
    r"<[|\uff5c]\s*det\s*[|\uff5c]>[\s\[\]()\d,.\-a-z:]{0,400}?<[|\uff5c]\s*/\s*det\s*[|\uff5c]>", re.I
)
_BOXISH_PREFIX_RE = re.compile(r"\A[\s\[\]()\d,.\-]*")


def normalise_label(label: str) -> str:
    """Lower-case, single spaces, only ``[a-z0-9_ ]``; empty or odd labels become ``text``."""
    words = label.lower().split()
    # A label broken over lines (``image\n_caption``) is one known label again.
    label = "".join(words) if "".join(words) in KNOWN_LABELS else " ".join(words)
    label = _LABEL_CLEAN_RE.sub("", label).strip()[:MAX_LABEL_CHARS].strip()
    return label or UNTAGGED_LABEL


def parse_boxes(payload: str) -> tuple[tuple[Box, ...], list[str]]:
    """Read boxes from the text between ``<|det|>`` and ``<|/det|>``.

    Accepts ``[[..], [..]]``, ``((..))``, stray letters between numbers, boxes split over lines.
    Coordinates are clamped to 0-999 and ordered so that x1 <= x2 and y1 <= y2.
    """
    problems: list[str] = []
    boxes: list[Box] = []
    groups = _GROUP_RE.findall(payload)
    if not groups and payload.strip():
        groups = [payload]
    for group in groups:
        if not group.strip():
            continue
        nums = _NUM_RE.findall(group)
        if len(nums) != 4:
            problems.append(f"unreadable box {group.strip()[:60]!r}")
            continue
        if _NUM_RE.sub("", group).strip(" ,\n\t") != "":
            problems.append(f"repaired box {group.strip()[:60]!r}")
        try:
            vals = [min(999, max(0, round(float(n)))) for n in nums]
        except (ValueError, OverflowError):
            problems.append(f"unreadable box {group.strip()[:60]!r}")
            continue
        x1, x2 = sorted((vals[0], vals[2]))
        y1, y2 = sorted((vals[1], vals[3]))
        boxes.append((x1, y1, x2, y2))
    if not boxes and payload.strip(" \n\t[]()"):
        problems.append(f"no box in {payload.strip()[:60]!r}")
    return tuple(boxes), problems


def _clean_text(text: str) -> str:
    # Content never carries special tokens; grounding tags were already split off.
    return strip_special_tokens(text)


def _split_unclosed_det(rest: str) -> tuple[str, str]:
    """``<|det|>`` never closed: take the box-looking start of the first line as the payload."""
    line_end = rest.find("\n")
    line = rest if line_end < 0 else rest[:line_end]
    cut = max(line.rfind("]]"), line.rfind("))"))
    if cut >= 0:
        return rest[: cut + 2], rest[cut + 2 :]
    m = _BOXISH_PREFIX_RE.match(line)
    n = m.end() if m else 0
    return rest[:n], rest[n:]


def _cut_label(block: str) -> bool:
    """Output ended right after ``<|ref|>tab``: the text is the start of a label, not content."""
    s = block.strip().lower()
    return 0 < len(s) < MAX_LABEL_CHARS and "\n" not in s and any(k.startswith(s) for k in KNOWN_LABELS)


def _plausible_label(s: str) -> bool:
    return len(s) <= MAX_LABEL_CHARS and "\n\n" not in s


def _parse_block(block: str, problems: list[str], *, last: bool) -> tuple[str, tuple[Box, ...], str]:
    """One block = text after a ``<|ref|>`` up to the next one. Returns label, boxes, content."""
    if last and _cut_label(block):
        problems.append(f"cut off inside a label {block.strip()!r}")
        return normalise_label(block), (), ""
    close = REF_CLOSE_RE.search(block)
    det = DET_OPEN_RE.search(block)
    if close is not None and (det is None or close.start() < det.start()):
        label_raw, rest = block[: close.start()], block[close.end() :]
        if len(label_raw) > MAX_LABEL_CHARS or "<" in label_raw:
            problems.append(f"label too long or odd {label_raw.strip()[:40]!r}: kept as text")
            rest = label_raw + "\n" + rest
            label_raw = UNTAGGED_LABEL
    elif det is not None and _plausible_label(block[: det.start()]):
        problems.append("missing <|/ref|>")
        label_raw, rest = block[: det.start()], block[det.start() :]
    else:
        problems.append("missing <|/ref|> and <|det|>")
        m = _KNOWN_PREFIX_RE.match(block)
        if m is not None:
            label_raw, rest = m.group(1), block[m.end() :]
        else:
            label_raw, rest = UNTAGGED_LABEL, block
    label = normalise_label(ANY_GROUNDING_TAG_RE.sub(" ", strip_special_tokens(label_raw)))
    boxes: tuple[Box, ...] = ()
    stripped = rest.lstrip()
    m_det = DET_OPEN_RE.match(stripped)
    if m_det is not None:
        rest = stripped[m_det.end() :]
        m_close = DET_CLOSE_RE.search(rest)
        if m_close is not None:
            payload, rest = rest[: m_close.start()], rest[m_close.end() :]
        else:
            problems.append("<|det|> never closed")
            payload, rest = _split_unclosed_det(rest)
        boxes, box_problems = parse_boxes(payload)
        problems.extend(box_problems)
    else:
        m_box = _BARE_BOXES_RE.match(stripped)
        if m_box is not None:  # ``<|ref|>text<|/ref|>[[1, 2, 3, 4]]``: the <|det|> tag is missing
            problems.append("missing <|det|>")
            boxes, box_problems = parse_boxes(m_box.group(1))
            problems.extend(box_problems)
            rest = stripped[m_box.end() :]
    # A whole ``<|det|>..<|/det|>`` later in the content is a box, not text.
    if DET_OPEN_RE.search(rest):
        rest, n = _DET_SPAN_RE.subn("", rest)
        if n:
            problems.append("box inside content removed")
    # Stray grounding tags inside content (``<|/ref|>`` twice, a second ``<|det|>``): drop the tag,
    # keep whatever text surrounds it.
    if ANY_GROUNDING_TAG_RE.search(rest):
        problems.append("stray grounding tag in content")
        rest = ANY_GROUNDING_TAG_RE.sub("", rest)
    return label, boxes, rest


def _iter_blocks(text: str) -> Iterator[tuple[bool, bool, str]]:
    """(is_head, is_last, text) for the head text and every ``<|ref|>`` block."""
    pos = 0
    for m in REF_OPEN_RE.finditer(text):
        yield pos == 0, False, text[pos : m.start()]
        pos = m.end()
    yield pos == 0, True, text[pos:]


def parse_grounding(raw: str, geometry: PageGeometry | None = None) -> tuple[list[Region], list[str]]:
    """Parse raw grounded (or plain) model output into regions in reading order.

    Text before the first ``<|ref|>`` (plain OCR output is all such text) becomes an untagged
    ``text`` region. With ``geometry`` the boxes are also converted to page pixels and PDF points.
    Never raises.
    """
    problems: list[str] = []
    regions: list[Region] = []
    if not isinstance(raw, str):
        return [], [f"raw text is {type(raw).__name__}, not str"]
    text, _ = strip_prompt_echo(raw)
    for is_head, is_last, block in _iter_blocks(text):
        if is_head:
            # Head text (before any <|ref|>): may still hold a stray ``<|det|>..<|/det|>`` box.
            content = block
            if ANY_GROUNDING_TAG_RE.search(block):
                problems.append("grounding tag outside a block")
                content = ANY_GROUNDING_TAG_RE.sub("", _DET_SPAN_RE.sub("", block))
            content = _clean_text(content)
            if content.strip():
                regions.append(Region(UNTAGGED_LABEL, (), (), (), content.strip("\n"), tagged=False))
            continue
        label, boxes, content = _parse_block(block, problems, last=is_last)
        content = _clean_text(content).strip("\n")
        px: tuple[Box, ...] = ()
        pt: tuple[tuple[float, float, float, float], ...] = ()
        if geometry is not None:
            px = tuple(geometry.to_px(b) for b in boxes)
            pt = tuple(geometry.to_pt(b) for b in boxes)
        regions.append(Region(label, boxes, px, pt, content, tagged=True))
    return regions, problems
