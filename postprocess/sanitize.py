"""Post-processing stage: safe output (HTML allowlist and safe link targets).

In: Markdown that may carry arbitrary HTML written by the model (``<script>`` when a page shows
code, event handlers, ``javascript:`` links, SVG, comments). Out: Markdown whose only raw HTML is
the allowlist below, and whose links and images only point to http(s), mailto or relative URLs.

Tables go through ``nh3`` (a maintained HTML sanitizer). Running ``nh3`` over the Markdown itself
would HTML-escape every ``<`` and ``&`` in plain text and break LaTeX (``a < b``, matrices with
``&``), so outside tables tags are filtered here and a final safety net escapes every ``<`` that
could still start HTML in a CommonMark renderer and is not an allowlisted tag.
"""

from __future__ import annotations

import bisect
import html
import re
from collections.abc import Callable

INLINE_TAGS = frozenset({"sup", "sub", "br", "b", "i", "em", "strong"})
TABLE_TAGS = frozenset({"table", "thead", "tbody", "tfoot", "tr", "td", "th", "caption"})
# Elements whose content is code, styling or non-text: removed with their content.
DROP_CONTENT_TAGS = frozenset(
    {
        "script",
        "style",
        "iframe",
        "object",
        "embed",
        "noscript",
        "template",
        "textarea",
        "title",
        "xmp",
        "noembed",
        "noframes",
        "svg",
        "frameset",
        "applet",
        "select",
    }
)
SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
# Comments the post-processor itself writes; everything else of the ``<!`` kind is removed.
OWN_COMMENTS = ("<!-- figure -->", "<!-- latex omitted -->")

# Element names a browser knows. Tags with these names are removed (text kept) when not allowlisted;
# other ``<Name>`` shapes (``List<String>``, ``a<b>c`` in maths) are text and get escaped instead.
KNOWN_ELEMENTS = frozenset(
    {
        "a",
        "abbr",
        "acronym",
        "address",
        "animate",
        "animatemotion",
        "animatetransform",
        "applet",
        "area",
        "article",
        "aside",
        "audio",
        "b",
        "base",
        "basefont",
        "bdi",
        "bdo",
        "bgsound",
        "big",
        "blink",
        "blockquote",
        "body",
        "br",
        "button",
        "canvas",
        "caption",
        "center",
        "cite",
        "code",
        "col",
        "colgroup",
        "data",
        "datalist",
        "dd",
        "del",
        "details",
        "dfn",
        "dialog",
        "dir",
        "div",
        "dl",
        "dt",
        "em",
        "embed",
        "fieldset",
        "figcaption",
        "figure",
        "font",
        "footer",
        "foreignobject",
        "form",
        "frame",
        "frameset",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "head",
        "header",
        "hgroup",
        "hr",
        "html",
        "i",
        "iframe",
        "image",
        "img",
        "input",
        "ins",
        "isindex",
        "kbd",
        "keygen",
        "label",
        "legend",
        "li",
        "link",
        "listing",
        "main",
        "map",
        "mark",
        "marquee",
        "math",
        "menu",
        "menuitem",
        "meta",
        "meter",
        "multicol",
        "nav",
        "nextid",
        "nobr",
        "noembed",
        "noframes",
        "noscript",
        "object",
        "ol",
        "optgroup",
        "option",
        "output",
        "p",
        "param",
        "picture",
        "plaintext",
        "portal",
        "pre",
        "progress",
        "q",
        "rb",
        "rp",
        "rt",
        "rtc",
        "ruby",
        "s",
        "samp",
        "script",
        "search",
        "section",
        "select",
        "set",
        "slot",
        "small",
        "source",
        "spacer",
        "span",
        "strike",
        "strong",
        "style",
        "sub",
        "summary",
        "sup",
        "svg",
        "table",
        "tbody",
        "td",
        "template",
        "textarea",
        "tfoot",
        "th",
        "thead",
        "time",
        "title",
        "tr",
        "track",
        "tt",
        "u",
        "ul",
        "use",
        "var",
        "video",
        "wbr",
        "xmp",
        # MathML and SVG elements that carry links or handlers in the wild.
        "mi",
        "mo",
        "mn",
        "ms",
        "mtext",
        "mrow",
        "msup",
        "msub",
        "msubsup",
        "mfrac",
        "msqrt",
        "mroot",
        "mtable",
        "mtr",
        "mtd",
        "mstyle",
        "semantics",
        "annotation",
        "annotation-xml",
        "maction",
        "mglyph",
        "mspace",
        "mpadded",
        "mphantom",
        "menclose",
        "munder",
        "mover",
        "munderover",
        "circle",
        "rect",
        "ellipse",
        "polyline",
        "polygon",
        "tspan",
        "defs",
        "lineargradient",
        "radialgradient",
        "clippath",
        "feimage",
        "animatecolor",
        "handler",
        "listener",
    }
)
_DROP_OPEN_RE = re.compile(r"<\s*(" + "|".join(sorted(DROP_CONTENT_TAGS)) + r")\b[^<>]{0,2000}>", re.I)
_DROP_CLOSE_RE = re.compile(r"<\s*/\s*(" + "|".join(sorted(DROP_CONTENT_TAGS)) + r")\s*>", re.I)
_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)|<!\[CDATA\[.*?(?:\]\]>|\Z)|<![A-Za-z][^<>]*>?|<\?[^<>]*>?", re.S)
_AUTOLINK_RE = re.compile(r"<([A-Za-z][A-Za-z0-9+.\-]{1,31}:[^\s<>]*|[^\s<>@]+@[^\s<>@]+\.[A-Za-z]{2,})>")
# CommonMark's raw-HTML grammar for open and closing tags.
_ATTR = r"""(?:\s+[A-Za-z_:][A-Za-z0-9_.:\-]*(?:\s*=\s*(?:[^\s"'=<>`]+|'[^']*'|"[^"]*"))?)"""
_TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9\-]*)(" + _ATTR + r"*)\s*/?>")
# A known element opened with attributes but never closed (``<img src=x onerror=alert(1)``).
_BROKEN_TAG_RE = re.compile(
    r"<\s*(?:/\s*)?(" + "|".join(sorted(KNOWN_ELEMENTS, key=len, reverse=True)) + r")\s[^<>\n]*=[^<>\n]*",
    re.I,
)
_MATH_RE = re.compile(r"\\\(.*?(?:\\\)|\Z)|\\\[.*?(?:\\\]|\Z)|\$\$.*?(?:\$\$|\Z)|\$[^$\n]+\$", re.S)
_TABLE_SEG_RE = re.compile(r"<table>.*?</table>", re.S)
_SPAN_VALUE_RE = re.compile(r"\d{1,3}")
# Inline link/image destination: ``](<dest>)`` or ``](dest)`` with one level of balanced parens.
LINK_DEST_RE = re.compile(r"\]\(\s*(<[^<>\n]*>|(?:[^\s()\\]|\\.|\((?:[^\s()\\]|\\.)*\))+)")
REF_DEF_RE = re.compile(r"^( {0,3}\[[^\]\n]+\]:[ \t]*)(<[^<>\n]*>|\S+)", re.M)
_SCHEME_RE = re.compile(r"([a-z][a-z0-9+.\-]*):")
_MD_ESCAPE_RE = re.compile(r"\\([!-/:-@\[-`{-~])")
_CTRL_RE = re.compile(r"[\x00-\x20\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")


def unsafe_url(dest: str) -> bool:
    """True when a link destination would run code or load something other than http(s)/mailto
    or a relative path, after the decoding a Markdown renderer and a browser would do."""
    d = dest.strip()
    if d.startswith("<") and d.endswith(">"):
        d = d[1:-1]
    for _ in range(3):  # entity-encoded entities (``&amp;#106;``) are decoded once by renderers;
        nd = html.unescape(_MD_ESCAPE_RE.sub(r"\1", d))  # be stricter and decode a few times
        if nd == d:
            break
        d = nd
    d = _CTRL_RE.sub("", d).replace("\\", "").lower()  # stricter than any browser
    m = _SCHEME_RE.match(d)
    if m is None:
        return False
    # ``a/b:c`` or ``./x:y`` are relative paths; a scheme is only what comes before the first
    # ``/``, ``?`` or ``#``.
    return m.group(1) not in SAFE_SCHEMES


def _nh3_clean(fragment: str) -> str:
    import nh3

    def keep_numeric(tag: str, attr: str, value: str) -> str | None:
        return value if attr in ("rowspan", "colspan") and _SPAN_VALUE_RE.fullmatch(value.strip()) else None

    return str(
        nh3.clean(
            fragment,
            tags=set(TABLE_TAGS | INLINE_TAGS),
            clean_content_tags=set(DROP_CONTENT_TAGS),
            attributes={"td": {"rowspan", "colspan"}, "th": {"rowspan", "colspan"}},
            attribute_filter=keep_numeric,
            strip_comments=True,
            link_rel=None,
            url_schemes=set(SAFE_SCHEMES),
        )
    )


def sanitize_table_html(fragment: str) -> str:
    """Sanitize an HTML table (tags, attributes and entities normalised by nh3)."""
    return _nh3_clean(fragment)


def _drop_content_elements(text: str) -> tuple[str, int]:
    """Remove ``<script>..</script>`` (and the other DROP_CONTENT_TAGS) with their content.

    One pass over open and close tags with a bisect for the matching close: a lazy ``.*?`` regex
    rescans the rest of the text for every unclosed ``<script>`` (quadratic on hostile input).
    An open tag with no close is left for the tag filter, which removes the tag and keeps the text.
    """
    closes: dict[str, list[tuple[int, int]]] = {}
    for m in _DROP_CLOSE_RE.finditer(text):
        closes.setdefault(m.group(1).lower(), []).append(m.span())
    if not closes:
        return text, 0
    out: list[str] = []
    pos = n = 0
    for m in _DROP_OPEN_RE.finditer(text):
        if m.start() < pos:
            continue
        spans = closes.get(m.group(1).lower(), [])
        k = bisect.bisect_left(spans, (m.end(), -1))
        if k == len(spans):
            continue
        out.append(text[pos : m.start()])
        pos = spans[k][1]
        n += 1
    out.append(text[pos:])
    return "".join(out), n


def _filter_tags(text: str) -> tuple[str, int]:
    n = 0

    def drop(m: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return ""

    text, dropped = _drop_content_elements(text)
    n += dropped
    text = _COMMENT_RE.sub(lambda m: m.group(0) if m.group(0) in OWN_COMMENTS else drop(m), text)

    def autolink(m: re.Match[str]) -> str:
        nonlocal n
        target = m.group(1)
        if "@" not in target.split(":", 1)[0] and unsafe_url(target):
            n += 1
            return ""  # a hostile URL is not page content
        return target  # bare text: GFM links http(s) and e-mail addresses by itself

    text = _AUTOLINK_RE.sub(autolink, text)

    def tag(m: re.Match[str]) -> str:
        nonlocal n
        closing, name = m.group(1), m.group(2).lower()
        if name in INLINE_TAGS:
            if m.group(0) != f"<{closing}{name}>":
                n += 1
            return "<br>" if name == "br" else f"<{closing}{name}>"
        if name in KNOWN_ELEMENTS or "-" in name:
            n += 1
            return ""
        return m.group(0)  # not HTML to a browser we care about: escaped by the safety net

    text = _sub_outside_math(_TAG_RE, tag, text)
    text = _sub_outside_math(_BROKEN_TAG_RE, drop, text)
    return text, n


def _math_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _MATH_RE.finditer(text)] if ("\\" in text or "$" in text) else []


def _inside(spans: list[tuple[int, int]], pos: int) -> bool:
    """``pos`` falls in one of the sorted, non-overlapping ``spans``."""
    k = bisect.bisect_right(spans, (pos, 1 << 62)) - 1
    return k >= 0 and spans[k][0] <= pos < spans[k][1]


def _sub_outside_math(pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str], text: str) -> str:
    spans = _math_spans(text)
    if not spans:
        return pattern.sub(repl, text)

    def guarded(m: re.Match[str]) -> str:
        inside = _inside(spans, m.start())
        # Inside maths a tag-looking run is a comparison (``0<i>1``): leave it to the safety net.
        return m.group(0) if inside else repl(m)

    return pattern.sub(guarded, text)


def _safe_links(text: str) -> tuple[str, int]:
    n = 0

    def link(m: re.Match[str]) -> str:
        nonlocal n
        if unsafe_url(m.group(1)):
            n += 1
            return "]("
        return m.group(0)

    def ref(m: re.Match[str]) -> str:
        nonlocal n
        if unsafe_url(m.group(2)):
            n += 1
            return m.group(1).rstrip().rstrip(":")
        return m.group(0)

    return REF_DEF_RE.sub(ref, LINK_DEST_RE.sub(link, text)), n


_ANY_TAG_START_RE = re.compile(r"<(?=[A-Za-z/!?])")
_ALLOWED_EXACT_RE = re.compile(
    r"<(?:/?(?:" + "|".join(sorted(INLINE_TAGS | TABLE_TAGS)) + r")"
    r"|(?:td|th)(?: (?:rowspan|colspan)=\"\d{1,3}\"){1,2})>"
    r"|" + "|".join(re.escape(c) for c in OWN_COMMENTS)
)


def escape_residual_html(text: str) -> tuple[str, int]:
    """Safety net: HTML-escape every ``<`` that could open a tag, comment or declaration in a
    CommonMark renderer unless it starts an exactly allowlisted tag or one of our own comments."""
    out: list[str] = []
    pos = 0
    n = 0
    spans = _math_spans(text) if _ANY_TAG_START_RE.search(text) else []
    for m in _ANY_TAG_START_RE.finditer(text):
        if m.start() < pos:
            continue
        allowed = _ALLOWED_EXACT_RE.match(text, m.start())
        out.append(text[pos : m.start()])
        if allowed is not None:
            out.append(allowed.group(0))
            pos = allowed.end()
        else:
            # In maths ``a<b`` must stay LaTeX, and ``< b`` means the same there; elsewhere an
            # entity renders exactly as the model wrote it.
            out.append("< " if _inside(spans, m.start()) else "&lt;")
            pos = m.start() + 1
            n += 1
    out.append(text[pos:])
    return "".join(out), n


def sanitize_markdown(text: str) -> tuple[str, int]:
    """Sanitize Markdown with embedded HTML. Tables already rendered as ``<table>...</table>``
    go through nh3; other HTML is filtered to the inline allowlist; unsafe link targets are
    removed. Returns the text and how many things were removed or rewritten."""
    count = 0
    parts: list[str] = []
    pos = 0
    for m in _TABLE_SEG_RE.finditer(text):
        seg, c = _sanitize_text(text[pos : m.start()])
        parts.append(seg)
        count += c
        cleaned = sanitize_table_html(m.group(0))
        if "<tbody>" not in m.group(0):  # html5ever inserts it; keep our rendering as it was
            cleaned = cleaned.replace("<tbody>", "").replace("</tbody>", "")
        count += 0 if cleaned == m.group(0) else 1
        # Some renderers read Markdown inside cells: no ``[x](javascript:..)`` there either.
        cleaned, c = _safe_links(cleaned)
        count += c
        parts.append(cleaned)
        pos = m.end()
    seg, c = _sanitize_text(text[pos:])
    parts.append(seg)
    count += c
    out, c = escape_residual_html("".join(parts))
    return out, count + c


def _sanitize_text(text: str) -> tuple[str, int]:
    if "<" not in text and "](" not in text and "]:" not in text:
        return text, 0
    text, n1 = _filter_tags(text)
    text, n2 = _safe_links(text)
    return text, n1 + n2
