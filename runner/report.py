"""Report stage: the per-document review page and the run dashboard (issue 12).

Runs after a document (or the whole run) is written, and only when ``--report`` is given.

- ``render_review_html(pdf_path, pages, ...)``: in, the PDF and the records of
  ``<stem>.pages.jsonl``; out, one self-contained HTML page (``<stem>.review.html``) showing each
  page's thumbnail with the grounded regions drawn over it, beside the cleaned Markdown rendered as
  sanitized HTML, with status, attempts, finish reason and counters; pages that are not ``ok`` can
  be filtered and stepped through with j/k (or n/p).
- ``render_run_dashboard(summary)``: in, the run summary JSON; out, ``_run.html`` with inline SVG
  charts (throughput over time, status distribution, retries, slowest documents, shards).

Both outputs use no network and no external asset. PyMuPDF and markdown-it are imported inside
the functions, so importing this module costs nothing when ``--report`` is off.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

__all__ = ["ThumbPolicy", "render_review_html", "render_run_dashboard", "sanitize_markdown"]

OK_STATUS = "ok"
# Colour class of each page status; anything unknown is treated as a failure so it stands out.
_STATUS_CLASS = {
    "ok": "st-ok",
    "blank": "st-muted",
    "retried_ok": "st-soft",
    "large_ok": "st-soft",
    "roi_improved": "st-soft",
    "fallback_text_layer": "st-warn",
    "failed": "st-bad",
    "too_large": "st-bad",
    "render_timeout": "st-bad",
    "render_error": "st-bad",
}
_STATUS_COLOUR = {
    "st-ok": "#2e7d32",
    "st-muted": "#9aa0a6",
    "st-soft": "#8d6e00",
    "st-warn": "#c75000",
    "st-bad": "#c62828",
}
# The renderer already hung or crashed on these pages: re-rendering them here could do it again.
_NO_RERENDER = frozenset({"render_timeout", "render_error"})
# Fallback only (the exponent is fitted per document): measured on text pages, 200 -> 400 px
# went 4.6 -> 23.7 KiB at q30, so JPEG bytes ~ width ** 2.3.
_SIZE_EXPONENT = 2.3
_REGION_COLOURS = ("#1f6feb", "#d1242f", "#1a7f37", "#8250df", "#bf8700", "#0a7ea4", "#cf222e", "#6e7781")

# What survives sanitizing: what the model emits for documents (tables with spans, sub/sup,
# headings, lists, code, emphasis, links). No <img>: an image URL would be an external asset.
_TAG_NAMES = (
    "a b blockquote br caption center code del div em h1 h2 h3 h4 h5 h6 hr i li ol p pre s span strong "
    "sub sup table tbody td tfoot th thead tr u ul"
)
_ALLOWED_TAGS = frozenset(_TAG_NAMES.split())
_ALLOWED_ATTRS = {
    "a": {"href", "title"},
    "td": {"rowspan", "colspan"},
    "th": {"rowspan", "colspan"},
    "ol": {"start"},
}
_URL_SCHEMES = frozenset({"http", "https", "mailto"})
_RAW_CAP = 6000  # characters of raw model output kept per page
_GROUNDING_HEAD = re.compile(r"<\|ref\|>(.*?)<\|/ref\|>\s*<\|det\|>(.*?)<\|/det\|>", re.S)


@dataclass(frozen=True)
class ThumbPolicy:
    """How thumbnails are made so that a 1,000-page review stays a few MB.

    Thumbnails are ``thumb_width`` pixels wide while all of them fit ``budget_bytes`` (base64
    size). Otherwise pages that are not ``ok`` (the ones people inspect) get at least
    ``flagged_share`` of the budget and ``ok`` pages the rest; a group that does not fit is rendered
    narrower, down to ``min_width`` (then at ``min_quality``), from a size-vs-width model fitted on a
    few sample pages.
    """

    thumb_width: int = 400
    min_width: int = 128
    jpeg_quality: int = 45
    min_quality: int = 20  # used with min_width when even that does not fit: 128 px, q20 ~ 1.7 kB
    budget_bytes: int = 4_000_000
    flagged_share: float = 0.6  # of the budget, at least, for pages that are not ok
    sample_pages: int = 6

    def __post_init__(self) -> None:
        if not 32 <= self.min_width <= self.thumb_width <= 4000:
            raise ValueError(
                f"need 32 <= min_width <= thumb_width <= 4000, got {self.min_width}, {self.thumb_width}"
            )
        if not 1 <= self.min_quality <= self.jpeg_quality <= 95:
            raise ValueError(
                f"need 1 <= min_quality <= jpeg_quality <= 95, got {self.min_quality}, {self.jpeg_quality}"
            )
        if self.budget_bytes < 0 or self.sample_pages < 1 or not 0.0 <= self.flagged_share <= 1.0:
            raise ValueError("need budget_bytes >= 0, sample_pages >= 1, 0 <= flagged_share <= 1")


@dataclass(frozen=True)
class Thumbnail:
    """One page thumbnail: a data: URI plus the page size in points (for the region overlay)."""

    data_uri: str | None
    width_pt: float
    height_pt: float
    note: str = ""  # why there is no image, when there is none


# --------------------------------------------------------------------------------------------- #
# Markdown -> sanitized HTML
# --------------------------------------------------------------------------------------------- #
def sanitize_markdown(markdown: str) -> str:
    """Render model Markdown (which may contain raw HTML tables) to HTML and sanitize it with nh3."""
    import nh3
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": True, "linkify": False}).enable(["table", "strikethrough"])
    rendered = md.render(markdown)
    return nh3.clean(
        rendered,
        tags=set(_ALLOWED_TAGS),
        attributes={k: set(v) for k, v in _ALLOWED_ATTRS.items()},
        url_schemes=set(_URL_SCHEMES),
        # Browsers strip leading spaces/control characters from URLs, so " javascript:x()" would run;
        # ammonia keeps it as a "relative" URL. Only absolute http(s)/mailto links survive.
        url_relative="deny",
        attribute_filter=_filter_attribute,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


def _filter_attribute(tag: str, attr: str, value: str) -> str | None:
    if attr == "href":
        url = value.strip(" \t\n\r\f\v\x00").lower()
        return value.strip() if url.startswith(("http://", "https://", "mailto:")) else None
    return value


# --------------------------------------------------------------------------------------------- #
# Thumbnails
# --------------------------------------------------------------------------------------------- #
def _open_pdf(pdf_path: str, password: str | None) -> tuple[Any, str]:
    """Open the PDF for thumbnails; returns (document or None, reason when None)."""
    import pymupdf

    try:
        doc = pymupdf.open(pdf_path)
    except Exception as exc:  # MuPDF raises many types; a review must still be written
        return None, f"cannot open PDF: {type(exc).__name__}: {exc}"
    if doc.needs_pass and not doc.authenticate(password or ""):
        doc.close()
        return None, "PDF is encrypted and the password was not accepted"
    return doc, ""


def _jpeg(page: Any, width: int, quality: int) -> bytes:
    import io

    import pymupdf
    from PIL import Image

    zoom = width / max(page.rect.width, 1.0)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    # Pillow's libjpeg-turbo encodes ~3x faster than MuPDF's writer (9 vs 36 ms for a 400 px page)
    # and, with optimize, about 8% smaller.
    buf = io.BytesIO()
    Image.frombytes("RGB", (pix.width, pix.height), pix.samples).save(
        buf, "JPEG", quality=quality, optimize=True
    )
    return buf.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def render_thumbnails(
    pdf_path: str, pages: Sequence[Mapping[str, Any]], policy: ThumbPolicy, password: str | None = None
) -> dict[int, Thumbnail]:
    """Thumbnails keyed by 1-based page number; a page that cannot be rendered gets a note instead."""
    wanted = [p for p in pages if isinstance(p.get("page"), int)]
    doc, reason = _open_pdf(pdf_path, password)
    if doc is None:
        return {int(p["page"]): Thumbnail(None, 0.0, 0.0, reason) for p in wanted}
    out: dict[int, Thumbnail] = {}
    try:
        flagged = [p for p in wanted if p.get("status") != OK_STATUS]
        ok = [p for p in wanted if p.get("status") == OK_STATUS]
        sample = [p for p in wanted if p.get("status") not in _NO_RERENDER]
        size = _SizeModel.sample(doc, sample, policy)
        budget = float(policy.budget_bytes)
        # Pages that are not ok are the ones people inspect: they get the larger share of the budget.
        flag_budget = (
            budget
            if not ok
            else max(budget * policy.flagged_share, budget - size.at(policy.thumb_width) * len(ok))
        )
        w_flag, q_flag = size.fit(len(flagged), flag_budget)
        w_ok, q_ok = size.fit(len(ok), budget - size.at(w_flag) * len(flagged))
        for rec in wanted:
            is_ok = rec.get("status") == OK_STATUS
            thumb = _one_thumb(doc, rec, w_ok if is_ok else w_flag, q_ok if is_ok else q_flag)
            out[int(rec["page"])] = thumb
    finally:
        doc.close()
    return out


def _one_thumb(doc: Any, rec: Mapping[str, Any], width: int, quality: int) -> Thumbnail:
    number = int(rec["page"])
    if rec.get("status") in _NO_RERENDER:
        return Thumbnail(None, 0.0, 0.0, f"not re-rendered ({rec.get('status')})")
    if not 1 <= number <= doc.page_count:
        return Thumbnail(None, 0.0, 0.0, f"page {number} is not in the PDF ({doc.page_count} pages)")
    try:
        page = doc.load_page(number - 1)
        rect = page.rect
        return Thumbnail(_data_uri(_jpeg(page, width, quality)), float(rect.width), float(rect.height))
    except Exception as exc:  # a damaged page only loses its thumbnail
        return Thumbnail(None, 0.0, 0.0, f"thumbnail failed: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _SizeModel:
    """Thumbnail bytes as a power of width, size(w) = full * (w / thumb_width) ** exponent, fitted on a
    few pages spread over the document at the widest and the narrowest allowed width."""

    full: float
    exponent: float
    policy: ThumbPolicy

    @classmethod
    def sample(cls, doc: Any, pages: Sequence[Mapping[str, Any]], policy: ThumbPolicy) -> _SizeModel:
        step = max(len(pages) // policy.sample_pages, 1)
        picked = list(pages)[::step][: policy.sample_pages]

        def mean_len(width: int) -> float:
            sizes = [
                len(t.data_uri)
                for r in picked
                if (t := _one_thumb(doc, r, width, policy.jpeg_quality)).data_uri
            ]
            return sum(sizes) / len(sizes) if sizes else 0.0

        full = mean_len(policy.thumb_width)
        exponent = _SIZE_EXPONENT
        if full > 0 and policy.min_width < policy.thumb_width:
            small = mean_len(policy.min_width)
            if small > 0:
                exponent = math.log(full / small) / math.log(policy.thumb_width / policy.min_width)
        return cls(full, min(max(exponent, 0.5), 3.0), policy)

    def at(self, width: int) -> float:
        return self.full * (width / self.policy.thumb_width) ** self.exponent

    def fit(self, count: int, budget: float) -> tuple[int, int]:
        """(width, JPEG quality): the widest thumbnail whose estimated total for ``count`` pages
        fits ``budget``; below ``min_width`` the quality drops to ``min_quality`` instead."""
        pol = self.policy
        if count == 0 or self.full * count <= budget:
            return pol.thumb_width, pol.jpeg_quality
        scale = (max(budget, 0.0) / (self.full * count)) ** (1 / self.exponent)
        width = int(pol.thumb_width * scale) // 8 * 8
        if width < pol.min_width:
            return pol.min_width, pol.min_quality
        return min(width, pol.thumb_width), pol.jpeg_quality


# --------------------------------------------------------------------------------------------- #
# Review page
# --------------------------------------------------------------------------------------------- #
def _asset(name: str) -> str:
    return resources.files("runner.report_assets").joinpath(name).read_text(encoding="utf-8")


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _status_class(status: str) -> str:
    return _STATUS_CLASS.get(status, "st-bad")


def _boxes(value: object) -> list[tuple[float, float, float, float]]:
    """``box_pt`` as normalised boxes: one ``[x1, y1, x2, y2]`` or a list of them (a block may carry
    several boxes); anything malformed is dropped."""
    if not isinstance(value, (list, tuple)):
        return []
    items = [value] if len(value) == 4 and not any(isinstance(v, (list, tuple)) for v in value) else value
    out = []
    for box in items:
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            continue
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            out.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return out


def _region_svg(regions: Iterable[object], width_pt: float, height_pt: float) -> str:
    """Labelled boxes over the thumbnail; the viewBox is the page in points, so no scaling maths."""
    font = max(height_pt / 70.0, 6.0)
    parts: list[str] = []
    for idx, region in enumerate(regions):
        if not isinstance(region, Mapping):
            continue
        boxes = _boxes(region.get("box_pt"))
        if not boxes:
            continue
        label = str(region.get("label") or "?")
        colour = _REGION_COLOURS[sum(map(ord, label)) % len(_REGION_COLOURS)]
        tip = str(region.get("text") or "")[:300]
        rects = "".join(
            f'<rect x="{a:.1f}" y="{b:.1f}" width="{c - a:.1f}" height="{d - b:.1f}" stroke="{colour}"/>'
            for a, b, c, d in boxes
        )
        x1, y1 = boxes[0][0], boxes[0][1]
        ty = y1 - 2 if y1 > font + 2 else y1 + font
        parts.append(
            f'<g class="region" data-label="{_e(label)}"><title>{_e(label)} #{idx + 1}: {_e(tip)}</title>'
            f'{rects}<text x="{x1 + 1:.1f}" y="{ty:.1f}" fill="{colour}" font-size="{font:.1f}">'
            f"{_e(label)}</text></g>"
        )
    if not parts:
        return ""
    return (
        f'<svg viewBox="0 0 {width_pt:.2f} {height_pt:.2f}" preserveAspectRatio="none" '
        f'aria-label="regions">{"".join(parts)}</svg>'
    )


def _thumb_html(rec: Mapping[str, Any], thumb: Thumbnail | None) -> str:
    number = rec.get("page")
    if thumb is None or thumb.data_uri is None:
        note = thumb.note if thumb is not None else "no thumbnail"
        return f'<div class="thumb nothumb">{_e(note)}</div>'
    regions = rec.get("regions") or []
    overlay = _region_svg(regions, thumb.width_pt, thumb.height_pt) if isinstance(regions, list) else ""
    ratio = thumb.height_pt / max(thumb.width_pt, 1.0)
    # The aspect ratio reserves the space before the lazy image arrives, so scrolling stays stable.
    return (
        f'<div class="thumb" style="aspect-ratio: 1 / {ratio:.4f}">'
        f'<img alt="page {_e(number)}" decoding="async" data-src="{thumb.data_uri}">{overlay}</div>'
    )


def _attempts_html(attempts: object) -> str:
    if not isinstance(attempts, list) or not attempts:
        return ""
    cols = (
        "attempt",
        "temperature",
        "resolution",
        "finish_reason",
        "stopped_by_eos",
        "output_tokens",
        "seconds",
        "degenerate",
        "error",
    )
    head = "".join(f"<th>{_e(c.replace('_', ' '))}</th>" for c in cols)
    rows = []
    for att in attempts:
        if isinstance(att, Mapping):
            rows.append("<tr>" + "".join(f"<td>{_e(_fmt(att.get(c)))}</td>" for c in cols) + "</tr>")
    return f'<table class="small attempts"><tr>{head}</tr>{"".join(rows)}</table>'


def _counters_html(counters: object) -> str:
    if not isinstance(counters, Mapping):
        return ""
    items = [(str(k), v) for k, v in counters.items() if v]
    if not items:
        return ""
    cells = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in sorted(items))
    return f'<table class="small counters"><tr><th>counter</th><th>n</th></tr>{cells}</table>'


def _markdown_html(markdown: str) -> str:
    """Sanitized HTML of a page's Markdown. Grounded-mode Markdown keeps a ``<|ref|>label<|/ref|>
    <|det|>boxes<|/det|>`` head per block: each head becomes a small label line and the block
    between heads is rendered on its own, so a reviewer sees block boundaries, not raw tags."""
    parts = _GROUNDING_HEAD.split(markdown)
    if len(parts) == 1:
        return sanitize_markdown(markdown)
    out = [sanitize_markdown(parts[0])] if parts[0].strip() else []
    for i in range(1, len(parts), 3):
        label, boxes, block = parts[i], parts[i + 1], parts[i + 2]
        out.append(f'<div class="gl"><span>{_e(label.strip())}</span> {_e(" ".join(boxes.split()))}</div>')
        out.append(sanitize_markdown(block))
    return "".join(out)


def _page_html(rec: Mapping[str, Any], thumb: Thumbnail | None) -> str:
    number = rec.get("page")
    status = str(rec.get("status") or "unknown")
    flagged = status != OK_STATUS
    cls = _status_class(status)
    kv = [
        ("engine", rec.get("engine")),
        ("finish", rec.get("finish_reason")),
        ("eos", rec.get("stopped_by_eos")),
        ("prompt tok", rec.get("prompt_tokens")),
        ("output tok", rec.get("output_tokens")),
        ("ocr s", rec.get("seconds")),
        ("render s", rec.get("render_seconds")),
    ]
    kv_html = "".join(f"<span><b>{_e(k)}</b> {_e(_fmt(v))}</span>" for k, v in kv)
    error = rec.get("error")
    notes = rec.get("notes") or []
    notes_html = "".join(f"<li>{_e(n)}</li>" for n in notes) if isinstance(notes, list) else ""
    markdown = str(rec.get("markdown") or "")
    body = _markdown_html(markdown) if markdown.strip() else '<p class="empty">(no Markdown)</p>'
    raw = str(rec.get("raw_text") or "")
    # A looping page's raw output runs to max_tokens (~30 kB); the head shows the loop well enough.
    shown = (
        raw
        if len(raw) <= _RAW_CAP
        else raw[:_RAW_CAP] + f"\n… ({len(raw) - _RAW_CAP} more chars in .pages.jsonl)"
    )
    raw_html = (
        f"<details><summary>raw model output ({len(raw)} chars)</summary><pre>{_e(shown)}</pre></details>"
        if raw
        else ""
    )
    return (
        f'<section class="page {cls}" id="p{_e(number)}" data-status="{_e(status)}" '
        f'data-flagged="{1 if flagged else 0}">'
        f"{_thumb_html(rec, thumb)}"
        f'<div class="meta"><h2>Page {_e(number)} <span class="badge {cls}">{_e(status)}</span></h2>'
        f'<div class="kv">{kv_html}</div>'
        + (f'<div class="error">{_e(error)}</div>' if error else "")
        + (f'<ul class="notes">{notes_html}</ul>' if notes_html else "")
        + _attempts_html(rec.get("attempts"))
        + _counters_html(rec.get("counters"))
        + raw_html
        + f'<div class="md">{body}</div></div></section>'
    )


def render_review_html(
    pdf_path: str,
    pages: list[dict[str, Any]],
    *,
    title: str,
    password: str | None = None,
    thumb_width: int = 400,
    policy: ThumbPolicy | None = None,
) -> str:
    """Self-contained review page for one document; see the module docstring."""
    policy = policy or ThumbPolicy(thumb_width=thumb_width, min_width=min(128, thumb_width))
    records = sorted((p for p in pages if isinstance(p, Mapping)), key=lambda p: _page_key(p.get("page")))
    thumbs = render_thumbnails(pdf_path, records, policy, password)
    counts: dict[str, int] = {}
    for rec in records:
        status = str(rec.get("status") or "unknown")
        counts[status] = counts.get(status, 0) + 1
    flagged = [rec.get("page") for rec in records if rec.get("status") != OK_STATUS]
    chips = "".join(
        f'<button type="button" class="chip {_status_class(s)}" data-status="{_e(s)}">{_e(s)} {n}</button>'
        for s, n in sorted(counts.items(), key=lambda kv: (kv[0] != OK_STATUS, kv[0]))
    )
    links = "".join(f'<a href="#p{_e(n)}">{_e(n)}</a>' for n in flagged)
    sections = "".join(_page_html(rec, thumbs.get(_page_key(rec.get("page")))) for rec in records)
    script = _asset("review.js")
    # Defence in depth behind nh3: only this exact script may run, so injected markup cannot.
    script_hash = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No network, ever: the page only uses inline style/script and data: images.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        f"style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'\">"
        f"<title>{_e(title)} — review</title><style>{_asset('review.css')}"
        f":root{{--thumb-w:{policy.thumb_width}px}}</style></head><body>"
        f'<header class="bar"><h1>{_e(title)}</h1><div class="controls">'
        f"<span>{len(records)} pages, {len(flagged)} flagged, "
        f'<span id="shown-count">{len(records)}</span> shown'
        '</span><label><input type="checkbox" id="only-flagged"> only pages that are not ok</label>'
        f'<span class="chips">{chips}</span>'
        '<span class="hint">j / n: next flagged · k / p: previous · f: toggle filter</span></div>'
        + (f'<div class="flagged-list">flagged: {links}</div>' if flagged else "")
        + f"</header><main>{sections}</main><script>{script}</script></body></html>\n"
    )


def _page_key(value: object) -> int:
    return value if isinstance(value, int) else 0


# --------------------------------------------------------------------------------------------- #
# Run dashboard
# --------------------------------------------------------------------------------------------- #
_W, _H = 640, 240
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 52, 14, 10, 30


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _num(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:g}" if float(v).is_integer() else f"{v:.2f}"


def _line_svg(
    series: Sequence[tuple[float, float]],
    *,
    x_label: str,
    y_label: str,
    colour: str,
    area: bool = False,
    mean: float | None = None,
) -> str:
    """A line chart with axes (and a dashed line at ``mean`` when given); ``series`` is downsampled."""
    if len(series) < 2:
        return '<p class="empty">not enough points to plot</p>'
    xs = [p[0] for p in series]
    ys = [p[1] for p in series]
    x0, x1 = min(xs), max(xs)
    y1 = max(max(ys), mean or 0.0, 1e-9) * 1.05
    pw, ph = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def sx(x: float) -> float:
        return _PAD_L + (x - x0) / ((x1 - x0) or 1.0) * pw

    def sy(y: float) -> float:
        return _PAD_T + ph - y / y1 * ph

    parts = [f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(y_label)} over {_e(x_label)}">']
    for t in _nice_ticks(0.0, y1):
        parts.append(
            f'<line class="gridl" x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
            f'<text x="{_PAD_L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{_tick(t)}</text>'
        )
    for t in _nice_ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{_H - _PAD_B + 14}" text-anchor="middle">{_tick(t)}</text>')
    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
    if area:
        parts.append(
            f'<polygon points="{sx(x0):.1f},{sy(0):.1f} {pts} {sx(xs[-1]):.1f},{sy(0):.1f}" '
            f'fill="{colour}" fill-opacity="0.12"/>'
        )
    parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
    if mean:
        parts.append(
            f'<line class="mean" x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{sy(mean):.1f}" y2="{sy(mean):.1f}" '
            f'stroke="#6b7280" stroke-dasharray="5 4"/><text x="{_W - _PAD_R - 2}" y="{sy(mean) - 4:.1f}" '
            f'text-anchor="end">run mean {mean:.2f}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{_PAD_L}" x2="{_PAD_L}" y1="{_PAD_T}" y2="{_PAD_T + ph}"/>'
        f'<line class="axis" x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{_PAD_T + ph}" y2="{_PAD_T + ph}"/>'
    )
    parts.append(f'<text x="{_PAD_L + pw / 2:.0f}" y="{_H - 2}" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(
        f'<text x="12" y="{_PAD_T + ph / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {_PAD_T + ph / 2:.0f})">{_e(y_label)}</text></svg>'
    )
    return "".join(parts)


def _hbar_svg(items: Sequence[tuple[str, float, str]], *, unit: str = "", label_w: int = 170) -> str:
    """Horizontal bars: (label, value, colour)."""
    if not items:
        return '<p class="empty">nothing to show</p>'
    row = 22
    height = row * len(items) + 8
    vmax = max(v for _, v, _ in items) or 1.0
    bar_w = _W - label_w - 90
    parts = [f'<svg viewBox="0 0 {_W} {height}" role="img">']
    for i, (label, value, colour) in enumerate(items):
        y = 4 + i * row
        w = max(value / vmax * bar_w, 0.0)
        short = label if len(label) <= 28 else "…" + label[-27:]
        parts.append(
            f'<g class="bar"><title>{_e(label)}: {_e(_num(value))}{_e(unit)}</title>'
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(short)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 7}" fill="{colour}" rx="2"/>'
            f'<text x="{label_w + w + 5:.1f}" y="{y + 15}">{_e(_num(value))}{_e(unit)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _downsample(points: Sequence[tuple[float, float]], limit: int = 400) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return list(points)
    step = len(points) / limit
    picked = [points[int(i * step)] for i in range(limit)]
    if picked[-1] != points[-1]:
        picked.append(points[-1])
    return picked


def _tick(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _rate_series(timeline: Sequence[tuple[float, float]], bins: int = 60) -> list[tuple[float, float]]:
    """Pages/s per time bin from the cumulative timeline (bin edges interpolated)."""
    if len(timeline) < 2:
        return []
    # Engines hand back pages in batches: with fewer than ~4 completions per bin the curve is spikes.
    bins = max(4, min(bins, len(timeline) // 4))
    t_end = timeline[-1][0]
    t0 = timeline[0][0]
    if t_end <= t0:
        return []
    width = (t_end - t0) / bins

    def done_at(t: float) -> float:
        # linear interpolation on the cumulative curve
        lo, hi = 0, len(timeline) - 1
        while lo < hi - 1:
            mid = (lo + hi) // 2
            if timeline[mid][0] <= t:
                lo = mid
            else:
                hi = mid
        (ta, pa), (tb, pb) = timeline[lo], timeline[hi]
        if t <= ta:
            return pa
        if t >= tb:
            return pb
        return pa + (pb - pa) * (t - ta) / (tb - ta)

    out = []
    for i in range(bins):
        a, b = t0 + i * width, t0 + (i + 1) * width
        out.append(((a + b) / 2, max(done_at(b) - done_at(a), 0.0) / width))
    return out


def _clean_timeline(raw: object) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    if not isinstance(raw, list):
        return pts
    for item in raw:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            try:
                t, n = float(item[0]), float(item[1])
            except (TypeError, ValueError):
                continue
            if math.isfinite(t) and math.isfinite(n):
                pts.append((t, n))
    pts.sort()
    # pages done is cumulative: a dip is a logging glitch, not negative throughput
    peak = -math.inf
    for i, (t, n) in enumerate(pts):
        peak = max(peak, n)
        pts[i] = (t, peak)
    return pts


def _as_float(value: object, default: float = 0.0) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _tile(key: str, value: str, bad: bool = False) -> str:
    cls = "tile bad" if bad else "tile"
    return f'<div class="{cls}"><div class="v">{_e(value)}</div><div class="k">{_e(key)}</div></div>'


def _card(title: str, body: str, cid: str) -> str:
    return f'<section class="card" id="{cid}"><h2>{_e(title)}</h2>{body}</section>'


def _int_map(value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): _as_float(v) for k, v in value.items()}


def render_run_dashboard(summary: dict[str, Any]) -> str:
    """Self-contained dashboard (``_run.html``) for one run summary; see the module docstring."""
    files = _int_map(summary.get("files"))
    pages = _int_map(summary.get("pages"))
    retries = _int_map(summary.get("retries"))
    counters = _int_map(summary.get("counters"))
    total_pages = sum(pages.values())
    not_ok = sum(v for k, v in pages.items() if k != OK_STATUS)
    failed_pages = sum(v for k, v in pages.items() if _status_class(k) == "st-bad")
    loop_rate = _as_float(summary.get("loop_rate"))
    timeline = _clean_timeline(summary.get("timeline"))

    tiles = "".join(
        [
            _tile("pages", _num(total_pages)),
            _tile("pages / s", f"{_as_float(summary.get('pages_per_s')):.2f}"),
            _tile("wall time", _duration(_as_float(summary.get("wall_seconds")))),
            _tile(
                "files ok / failed / skipped",
                " / ".join(_num(files.get(k, 0)) for k in ("ok", "failed", "skipped")),
                bad=files.get("failed", 0) > 0,
            ),
            _tile("pages not ok", f"{_num(not_ok)} ({_pct(not_ok, total_pages)})", bad=failed_pages > 0),
            _tile("loop rate", f"{loop_rate * 100:.1f}%", bad=loop_rate > 0.05),
            _tile(
                "retries improved",
                f"{_num(retries.get('improved', 0))} / {_num(retries.get('attempted', 0))}",
            ),
        ]
    )

    done = _line_svg(
        _downsample(timeline),
        x_label="seconds since start",
        y_label="pages done",
        colour="#1f6feb",
        area=True,
    )
    rate = _line_svg(
        _rate_series(timeline),
        x_label="seconds since start",
        y_label="pages / s",
        colour="#1a7f37",
        mean=_as_float(summary.get("pages_per_s")) or None,
    )
    status_items = [
        (f"{k} ({_pct(v, total_pages)})", v, _STATUS_COLOUR[_status_class(k)])
        for k, v in sorted(pages.items(), key=lambda kv: -kv[1])
    ]
    retry_items = [
        ("retries attempted", retries.get("attempted", 0), "#8d6e00"),
        ("retries improved", retries.get("improved", 0), "#2e7d32"),
        ("large pass", retries.get("large_pass", 0), "#8d6e00"),
        ("large improved", retries.get("large_improved", 0), "#2e7d32"),
    ]
    retry_rates = (
        f"<p>retry success {_pct(retries.get('improved', 0), retries.get('attempted', 0))} · "
        f"large success {_pct(retries.get('large_improved', 0), retries.get('large_pass', 0))} · "
        f"loop rate {loop_rate * 100:.2f}%</p>"
    )

    shards = summary.get("shards") or []
    shard_items = []
    if isinstance(shards, list):
        for sh in shards:
            if isinstance(sh, Mapping):
                gpu = sh.get("gpu")
                label = f"{sh.get('shard', '?')}" + (f" (GPU {gpu})" if gpu not in (None, "") else "")
                shard_items.append(
                    (
                        f"{label}, {_num(_as_float(sh.get('pages')))} p",
                        _as_float(sh.get("pages_per_s")),
                        "#0a7ea4",
                    )
                )

    docs = [d for d in (summary.get("docs") or []) if isinstance(d, Mapping)]
    slow = sorted(docs, key=lambda d: -_as_float(d.get("seconds")))[:15]
    slow_items = [(str(d.get("source", "?")), _as_float(d.get("seconds")), "#8250df") for d in slow]
    failed_docs = [d for d in docs if d.get("status") not in ("ok", "skipped")]
    counter_rows = "".join(
        f'<tr><td>{_e(k)}</td><td class="num">{_e(_num(v))}</td></tr>'
        for k, v in sorted(counters.items(), key=lambda kv: (-kv[1], kv[0]))
        if v
    )

    cards = [
        _card("Pages done over time", done, "c-done"),
        _card("Throughput (pages / s)", rate, "c-rate"),
        _card("Page status", _hbar_svg(status_items), "c-status"),
        _card("Retries and outcomes", _hbar_svg(retry_items) + retry_rates, "c-retries"),
        _card(
            "Slowest documents", _hbar_svg(slow_items, unit=" s", label_w=230) + _docs_table(slow), "c-slow"
        ),
        _card("Throughput per shard / GPU", _hbar_svg(shard_items, unit=" p/s", label_w=230), "c-shards"),
        _card(
            "Failed documents",
            _docs_table(failed_docs) if failed_docs else '<p class="empty">none</p>',
            "c-failed",
        ),
        _card(
            "Counters",
            f'<table><tr><th>counter</th><th class="num">n</th></tr>{counter_rows}</table>'
            if counter_rows
            else '<p class="empty">none</p>',
            "c-counters",
        ),
    ]
    sub = (
        f"started {_e(summary.get('started', '?'))} · engine {_e(summary.get('engine', '?'))} · "
        f"mode {_e(summary.get('mode', '?'))} · {len(docs)} documents"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>OCR run — {_e(summary.get('started', ''))}</title><style>{_asset('dashboard.css')}</style>"
        f'</head><body><h1>OCR run dashboard</h1><div class="sub">{sub}</div>'
        f'<div class="tiles">{tiles}</div><div class="grid">{"".join(cards)}</div></body></html>\n'
    )


def _docs_table(docs: Sequence[Mapping[str, Any]]) -> str:
    if not docs:
        return ""
    rows = "".join(
        f'<tr><td>{_doc_link(d)}</td><td class="st">{_e(d.get("status"))}</td>'
        f'<td class="num">{_e(_num(_as_float(d.get("pages"))))}</td>'
        f'<td class="num">{_as_float(d.get("seconds")):.1f}</td>'
        f'<td class="err">{_e(d.get("error") or "")}</td></tr>'
        for d in docs
    )
    return (
        '<table class="docs"><tr><th>source</th><th class="st">status</th><th class="num">pages</th>'
        f'<th class="num">s</th><th>error</th></tr>{rows}</table>'
    )


def _doc_link(doc: Mapping[str, Any]) -> str:
    """The source, linked to its review page: the dashboard sits at the output root and every
    document with pages got ``<output>.review.html`` there (a relative, percent-encoded path)."""
    output = doc.get("output")
    label = _e(doc.get("source"))
    if not isinstance(output, str) or not output or _as_float(doc.get("pages")) <= 0:
        return label
    if output.startswith("/") or "://" in output or ".." in output.split("/"):
        return label
    return f'<a href="{_e(quote(output) + ".review.html")}">{label}</a>'


def _pct(part: float, whole: float) -> str:
    return f"{part / whole * 100:.1f}%" if whole else "–"


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
