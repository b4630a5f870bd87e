"""Tests for postprocess.tokens: special tokens and prompt echoes."""

from __future__ import annotations

from postprocess.tokens import count_special_tokens, has_eos, strip_prompt_echo, strip_special_tokens

EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"


def test_strip_all_token_kinds() -> None:
    raw = f"<\uff5cbegin\u2581of\u2581sentence\uff5c><|User|><image>\nA<|grounding|>B<|ref|>C<|/det|>D{EOS}"
    assert strip_special_tokens(raw) == "\nABCD"
    assert count_special_tokens(raw) == 7


def test_strip_reformed_and_partial_tokens() -> None:
    assert strip_special_tokens("x<<|ref|>|det|>y") == "xy"
    assert strip_special_tokens("<ima<image>ge>z") == "z"
    assert strip_special_tokens("text cut <|re") == "text cut "
    assert strip_special_tokens("text cut <\uff5cend\u2581") == "text cut "
    assert strip_special_tokens("a < b and c | d > e") == "a < b and c | d > e"


def test_eos_detection() -> None:
    assert has_eos("done" + EOS)
    assert not has_eos("done")


def test_prompt_echo() -> None:
    text, echoed = strip_prompt_echo("<image>\n<|grounding|>Convert the document to markdown. Body")
    assert (text, echoed) == ("Body", True)
    text, echoed = strip_prompt_echo("<|User|><image>\nFree OCR.<|Assistant|>Body")
    assert (text, echoed) == ("Body", True)
    text, echoed = strip_prompt_echo("Convert this, please.")
    assert (text, echoed) == ("Convert this, please.", False)
