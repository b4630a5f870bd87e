"""Tests for postprocess.markdown: the canonical Markdown pass and page joining."""

from __future__ import annotations

from postprocess.markdown import (
    citations_to_footnotes,
    collapse_blank_lines,
    cut_latex_spam,
    dehyphenate,
    join_pages,
    normalise_headings,
    unwrap_fake_math,
)


def test_dehyphenate_joins_wrapped_words() -> None:
    text, n = dehyphenate("This is an exam-\nple of text.")
    assert (text, n) == ("This is an example\nof text.", 1)
    text, n = dehyphenate("a recog-\nnition")
    assert (text, n) == ("a recognition", 1)


def test_dehyphenate_keeps_real_compounds() -> None:
    assert dehyphenate("the state-of-the-\nart method")[0] == "the state-of-the-art\nmethod"
    assert dehyphenate("a well-\nknown fact")[0] == "a well-known\nfact"
    assert dehyphenate("self-\ncontained")[0] == "self-contained"
    assert dehyphenate("COVID-\n19 cases")[0] == "COVID-19\ncases"
    assert dehyphenate("pre-\nCambrian rocks")[0] == "pre-Cambrian\nrocks"
    # Used with a hyphen elsewhere on the page: keep it.
    assert (
        dehyphenate("a data-driven idea; data-\ndriven again")[0] == "a data-driven idea; data-driven\nagain"
    )
    assert dehyphenate("a cross-check\nand a foo-bar then foo-\nbar")[0].endswith("foo-bar")
    assert dehyphenate("in-line - \nnext")[1] == 0
    assert dehyphenate("- item\n- item")[1] == 0


def test_citations() -> None:
    assert citations_to_footnotes("cancer<sup>71</sup>.") == ("cancer[^71].", 1)
    assert citations_to_footnotes("shown.<sup>3,5-7</sup>")[0] == "shown.[^3][^5][^6][^7]"
    assert citations_to_footnotes("area in m<sup>2</sup>") == ("area in m<sup>2</sup>", 0)
    assert citations_to_footnotes("10<sup>5</sup> cells") == ("10<sup>5</sup> cells", 0)
    assert citations_to_footnotes("studies\\(^{12}\\) show")[0] == "studies[^12] show"
    inside = "<table><tr><td>value<sup>1</sup></td></tr></table>"
    assert citations_to_footnotes(inside) == (inside, 0)


def test_headings() -> None:
    assert normalise_headings("Big Title", "title")[0] == "# Big Title"
    assert normalise_headings("### Big\nTitle", "title")[0] == "# Big Title"
    assert normalise_headings("Methods", "sub_title")[0] == "## Methods"
    assert normalise_headings("### 2.1 Data", "sub_title")[0] == "### 2.1 Data"
    assert normalise_headings("#Intro", "sub_title")[0] == "## Intro"
    assert normalise_headings("######## Deep ##", "text")[0] == "###### Deep"
    assert normalise_headings("#hashtag stays", "text")[0] == "#hashtag stays"
    assert normalise_headings("#\nbody", "text")[0] == "\nbody"


def test_collapse_blank_lines() -> None:
    assert collapse_blank_lines("\n\na  \n\n\n\nb\t\n\n\n") == "a\n\nb"


def test_latex_spam() -> None:
    tikz = "before \\begin{tikzpicture}\\draw (0,0) -- (1,1);\\end{tikzpicture} after"
    assert cut_latex_spam(tikz) == ("before <!-- latex omitted --> after", 1)
    long_eq = "\\[ " + " + ".join(f"x_{{{i}}}" for i in range(600)) + " \\]"
    assert cut_latex_spam(long_eq)[1] == 1
    short = "\\[ E = mc^2 \\]"
    assert cut_latex_spam(short) == (short, 0)
    assert cut_latex_spam("\\frac{a}{b} " * 100, is_equation=True) == ("<!-- latex omitted -->", 1)


def test_fake_math() -> None:
    assert unwrap_fake_math("in \\[ 1995 \\] and \\[3, 4\\]") == ("in [1995] and [3, 4]", 2)
    assert unwrap_fake_math("\\[ x^2 \\]") == ("\\[ x^2 \\]", 0)


def test_join_pages() -> None:
    assert join_pages(["one\n", "\ntwo", "three"]) == (
        "one\n\n----- Page 2 -----\n\ntwo\n\n----- Page 3 -----\n\nthree\n"
    )
    assert join_pages(["only"]) == "only\n"
    assert join_pages([]) == ""
    assert join_pages(["", "x"]) == "\n\n----- Page 2 -----\n\nx\n"
