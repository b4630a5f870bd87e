"""Post-processing stage: output audit (the invariants clean/grounded output must keep).

In: Markdown produced by ``clean_page``. Out: a list of violations (empty when the text is safe):
special tokens or ``<image>`` left in clean output, HTML outside the allowlist, unsafe link
targets. Used by the tests, the fuzzer (``tools/fuzz_postprocess.py``) and, if wanted, by the
runner as a last check before writing.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from postprocess.sanitize import LINK_DEST_RE, REF_DEF_RE, escape_residual_html, unsafe_url
from postprocess.tokens import IMAGE_TOKEN_RE, SPECIAL_TOKEN_RE

_GROUNDED_LINE_RE = re.compile(
    r"^<\|ref\|>[a-z0-9_ ]{1,48}<\|/ref\|>"
    r"<\|det\|>\[(?:\[\d{1,3}, \d{1,3}, \d{1,3}, \d{1,3}\](?:, )?)*\]<\|/det\|>$"
)
_GROUNDING_PIECE_RE = re.compile(r"<[|\uff5c]\s*(?:/\s*)?(?:ref|det)\s*[|\uff5c]>")


def audit_markdown(text: str, *, mode: str = "clean") -> list[str]:
    """Return what is wrong with ``text`` as output of ``mode``; an empty list means nothing."""
    problems: list[str] = []
    if mode == "clean":
        problems += [f"special token {t!r}" for t in SPECIAL_TOKEN_RE.findall(text)[:5]]
    else:
        for line in text.split("\n"):
            if _GROUNDING_PIECE_RE.search(line) and not _GROUNDED_LINE_RE.match(line):
                problems.append(f"malformed grounding line {line[:80]!r}")
        rest = "\n".join(line for line in text.split("\n") if not _GROUNDED_LINE_RE.match(line))
        problems += [f"special token {t!r}" for t in SPECIAL_TOKEN_RE.findall(rest)[:5]]
    problems += [f"image token {t!r}" for t in IMAGE_TOKEN_RE.findall(text)[:5]]
    _, residual = escape_residual_html(text)
    if residual:
        problems.append(f"{residual} HTML tag(s) outside the allowlist")
    for m in LINK_DEST_RE.finditer(text):
        if unsafe_url(m.group(1)):
            problems.append(f"unsafe link {m.group(1)[:60]!r}")
    for m in REF_DEF_RE.finditer(text):
        if unsafe_url(m.group(2)):
            problems.append(f"unsafe link definition {m.group(2)[:60]!r}")
    return problems


# Elements a CommonMark renderer makes from Markdown syntax, plus the HTML allowlist.
RENDERED_OK = frozenset(
    {"p", "a", "img", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "code", "pre", "blockquote", "hr",
     "table", "thead", "tbody", "tfoot", "tr", "td", "th", "caption", "sup", "sub", "br", "b", "i", "em",
     "strong"}
)  # fmt: skip
OWN_COMMENT_TEXTS = frozenset({"figure", "latex omitted"})


@functools.lru_cache(maxsize=1)
def _renderer() -> Any:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True, "linkify": False}).enable("table")


def rendered_html_problems(markdown: str) -> list[str]:
    """Render ``markdown`` the way a careless viewer would (CommonMark, raw HTML on, tables) and
    list every element, attribute, comment or URL in the result that is not safe. Needs
    ``markdown-it-py`` (a dev/report dependency), imported here only."""
    from html.parser import HTMLParser

    bad: list[str] = []

    class _Audit(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag not in RENDERED_OK:
                bad.append(f"element <{tag}>")
            for name, value in attrs:
                if name.startswith("on") or name in ("style", "srcdoc", "formaction"):
                    bad.append(f"attribute {name} on <{tag}>")
                if name in ("href", "src", "action", "data") and value and unsafe_url(value):
                    bad.append(f"{name}={value[:60]!r}")

        def handle_comment(self, data: str) -> None:
            if data.strip() not in OWN_COMMENT_TEXTS:
                bad.append(f"comment {data[:40]!r}")

        def handle_decl(self, decl: str) -> None:
            bad.append(f"declaration {decl[:40]!r}")

        def handle_pi(self, data: str) -> None:
            bad.append(f"processing instruction {data[:40]!r}")

    html = _renderer().render(markdown)
    parser = _Audit(convert_charrefs=True)
    parser.feed(html)
    parser.close()
    return bad
