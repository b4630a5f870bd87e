"""Tests for postprocess.degenerate: loop detection and cutting."""

from __future__ import annotations

from postprocess.degenerate import cut_char_runs, cut_line_runs, detect_degenerate

EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
OK = "<|ref|>text<|/ref|><|det|>[[1, 2, 300, 40]]<|/det|>\nA normal paragraph of text." + EOS


def test_normal_page_is_not_degenerate() -> None:
    assert detect_degenerate(OK) is None
    assert detect_degenerate(OK, stopped_by_eos=True) is None
    assert detect_degenerate("") is None
    # A table of contents with dot leaders is fine.
    toc = "\n".join(f"{i}. Chapter {i} " + "." * 80 + f" {i * 7}" for i in range(1, 60)) + EOS
    assert detect_degenerate(toc) is None
    # A form that repeats a few fields is not a loop.
    assert detect_degenerate("Signature: ________\nDate: ________\n\n" * 6 + EOS) is None


def test_no_eos_only_when_engine_says_so() -> None:
    body = OK.replace(EOS, "")
    assert detect_degenerate(body) is None
    assert detect_degenerate(body, stopped_by_eos=False) == "no_eos"
    assert detect_degenerate(OK, stopped_by_eos=False) is None


def test_reasons() -> None:
    assert detect_degenerate(OK + "<|ref|>image<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n" * 6) == "repeated_box"
    assert detect_degenerate("Intro\n" + "1\n" * 25) == "line_run"
    assert detect_degenerate("Intro\n" + "alpha\nbeta gamma\n" * 10) == "repeated_block"
    assert detect_degenerate("Intro " + "The same sentence again, said once more. " * 200) == "repeated_tail"
    assert detect_degenerate("x " + "\\end{tikzpicture}" * 300 + EOS) == "repeated_tail"
    assert detect_degenerate("x = " + "\\overline{" * 40) == "char_run"
    rows = "<table><tr><td>h</td></tr>" + "<tr><td></td></tr>" * 40
    assert detect_degenerate(rows) == "repeated_rows"
    assert detect_degenerate("<|ref|>text<|/ref|><|det|>[[1, 2, 3") == "cut_mid_tag"
    assert detect_degenerate("Some text <|/re") == "cut_mid_tag"
    assert detect_degenerate("<table><tr><td>cut") == "cut_mid_tag"
    eq = "<|ref|>equation<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n\\[ " + "".join(
        f"a_{{{i}}} + " for i in range(800)
    )
    assert detect_degenerate(eq) == "latex_loop"


def test_detect_never_raises() -> None:
    assert detect_degenerate(None) == "not_text"  # type: ignore[arg-type]
    for raw in ["<|ref|>", "<" * 5000, "\n" * 5000, "ab" * 10000]:
        detect_degenerate(raw)


def test_cut_char_runs() -> None:
    text, n = cut_char_runs("start " + "overline[[" * 50 + " end")
    assert text == "start " + "overline[[" * 3 + " end" and n == 1
    text, n = cut_char_runs("short ..... leader")
    assert (text, n) == ("short ..... leader", 0)


def test_cut_line_runs() -> None:
    text, n = cut_line_runs("Intro\n" + "1\n" * 29 + "End")
    assert text == "Intro\n1\nEnd" and n == 1
    text, n = cut_line_runs("a\nb\n" * 6 + "c")
    assert text == "a\nb\nc" and n == 1
    text, n = cut_line_runs("1\n2\n3\n3\n4")
    assert (text, n) == ("1\n2\n3\n3\n4", 0)
