"""Property tests for postprocess: random tag soup never crashes the parser or leaks a tag;
the words of well-formed input survive cleaning; output is always safe to render."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postprocess import CleanOptions, clean_page, detect_degenerate, join_pages, parse_grounding
from postprocess.audit import audit_markdown, rendered_html_problems

PIECES = [
    "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<\uff5cref\uff5c>", "<|grounding|>", "<image>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|User|>", "<|Assistant|>", "<|", "|>", "<\uff5c", "\uff5c>",
    "[[", "]]", "[", "]", "(", ")", ", ", "12", "999", "-3", "text", "title", "image", "table", "equation",
    "\n", "\n\n", " ", "-\n", "# ", "<table>", "</table>", "<tr>", "</tr>", "<td>", "</td>", "<th>",
    '<td rowspan="2">', "<td colspan=3>", "None", "N/A", "-", "&lt;", "&amp;", "&#x61;", "&", "<", ">",
    "<script>", "</script>", "<img src=x onerror=alert(1)>", "<svg onload=alert(1)>", "javascript:",
    "[x](", "](javascript:alert(1))", "<a href=javascript:x>", "</a>", "<!--", "-->", "<center>", "</center>",
    "<sup>", "</sup>", "71", "\\[", "\\]", "\\(", "\\)", "$$", "\\begin{pmatrix}", "\\overline{", "<style>",
    "<iframe>", "<br>", "<b>", "</b>", "word", "state-of-the-", "art", "exam-", "ple",
]  # fmt: skip
soup = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=80).map("".join)
OPTIONS = [CleanOptions(), CleanOptions(mode="grounded"), CleanOptions(table_format="markdown")]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(soup)
def test_parser_never_raises_and_keeps_plain_words(raw: str) -> None:
    regions, problems = parse_grounding(raw)
    assert all(isinstance(p, str) for p in problems)
    assert all(0 <= v <= 999 for r in regions for b in r.boxes for v in b)
    assert detect_degenerate(raw) is None or isinstance(detect_degenerate(raw), str)


@FAST
@given(soup, st.sampled_from(OPTIONS))
def test_clean_output_never_has_tags_or_scripts(raw: str, options: CleanOptions) -> None:
    res = clean_page(raw, options=options)
    assert audit_markdown(res.markdown, mode=options.mode) == [], res.markdown
    assert rendered_html_problems(res.markdown) == [], res.markdown
    if options.mode == "clean":
        assert not re.search(r"<[|\uff5c][^<>|\uff5c\n]{0,64}[|\uff5c]>|<image>", res.markdown)


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=10)
LABELS = ["text", "title", "sub_title", "image_caption", "table_caption", "table_footnote", "text_begin"]


@st.composite
def wellformed_page(draw: st.DrawFn) -> tuple[str, list[str]]:
    n = draw(st.integers(min_value=1, max_value=8))
    words = draw(st.lists(WORD, min_size=n * 3, max_size=n * 3 + 20, unique_by=str.lower))
    blocks, used = [], []
    per = len(words) // n
    for i in range(n):
        label = draw(st.sampled_from(LABELS))
        x1, y1 = draw(st.integers(0, 900)), draw(st.integers(0, 900))
        box = f"[[{x1}, {y1}, {x1 + draw(st.integers(1, 99))}, {y1 + draw(st.integers(1, 99))}]]"
        chunk = words[i * per : (i + 1) * per]
        sep = draw(st.sampled_from([" ", "\n"]))
        blocks.append(f"<|ref|>{label}<|/ref|><|det|>{box}<|/det|>\n{sep.join(chunk)}\n")
        used.extend(chunk)
    eos = draw(st.sampled_from(["", "<\uff5cend\u2581of\u2581sentence\uff5c>"]))
    return "\n".join(blocks) + eos, used


@FAST
@given(wellformed_page(), st.sampled_from(OPTIONS))
def test_words_of_wellformed_input_survive(page: tuple[str, list[str]], options: CleanOptions) -> None:
    raw, words = page
    res = clean_page(raw, options=options)
    found = set(re.findall(r"[A-Za-z]+", res.markdown))
    assert [w for w in words if w not in found] == []
    assert res.problems == ()
    assert detect_degenerate(raw) is None


@FAST
@given(st.lists(st.text(max_size=30), max_size=6))
def test_join_pages_markers(pages: list[str]) -> None:
    doc = join_pages(pages)
    if pages:
        assert doc.endswith("\n")
        lines = doc.split("\n")
        for n in range(2, len(pages) + 1):
            i = lines.index(f"----- Page {n} -----")
            assert lines[i - 1] == ""
