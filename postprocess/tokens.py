"""Post-processing stage: special tokens and prompt echoes in raw model text.

In: raw engine text (decoded with ``skip_special_tokens=False``). Out: the same text without
``<|...|>`` / ``<｜...｜>`` tokens, ``<image>`` placeholders, half-written tokens cut off at
``max_tokens``, or an echoed prompt at the start. Grounding tags are special tokens too: callers
that need them (the grounding parser) split on them *before* stripping.
"""

from __future__ import annotations

import re

EOS_TOKEN = "<｜end▁of▁sentence｜>"

# ASCII bar ``|`` and full-width bar ``｜`` (U+FF5C) are both used by the DeepSeek tokenizer; the
# model occasionally mixes them, so either side may be either bar.
_BAR = "[|\uff5c]"
SPECIAL_TOKEN_RE = re.compile(rf"<{_BAR}[^<>|\uff5c\n]{{0,64}}{_BAR}>")
IMAGE_TOKEN_RE = re.compile(r"<image>", re.IGNORECASE)
# A token the model started but never finished (output cut at max_tokens): ``<|re`` or ``<｜end▁``.
PARTIAL_TOKEN_RE = re.compile(rf"<{_BAR}[^<>\n]{{0,64}}\Z")
_LT_BEFORE_TOKEN_RE = re.compile(rf"<(?={_BAR}|image>)", re.IGNORECASE)
EOS_RE = re.compile(rf"<{_BAR}\s*end[\u2581_ ]of[\u2581_ ]sentence\s*{_BAR}>")

# Prompts the model may echo back (upstream DeepSeek-OCR prompts). Only removed at the very start.
_PROMPTS = (
    r"Convert the document to markdown\.?",
    r"Free OCR\.?",
    r"OCR this image\.?",
    r"Parse the figure\.?",
    r"Describe this image in detail\.?",
    rf"Locate <{_BAR}ref{_BAR}>.{{0,200}}?<{_BAR}/ref{_BAR}> in the image\.?",
)
_ROLE = rf"(?:<{_BAR}(?:User|Assistant|grounding|begin[\u2581_ ]of[\u2581_ ]sentence){_BAR}>|<image>|\s)"
PROMPT_ECHO_RE = re.compile(rf"\A{_ROLE}*(?:{'|'.join(_PROMPTS)})(?:{_ROLE}*<{_BAR}Assistant{_BAR}>)?", re.S)
_LEADING_ROLE_RE = re.compile(rf"\A{_ROLE}*(?:<{_BAR}(?:User|Assistant){_BAR}>)")


def count_special_tokens(text: str) -> int:
    """Number of complete special tokens, ``<image>`` placeholders and a trailing partial token."""
    n = len(SPECIAL_TOKEN_RE.findall(text)) + len(IMAGE_TOKEN_RE.findall(text))
    return n + (1 if PARTIAL_TOKEN_RE.search(text) else 0)


def strip_special_tokens(text: str) -> str:
    """Remove every ``<|...|>`` / ``<｜...｜>`` token (EOS included), ``<image>`` and a partial token
    at the end. Text between tokens is kept as is."""
    # Loop to a fixed point: removing ``<|ref|>`` from ``<<|ref|>|x|>`` forms a new token. Nesting
    # deeper than a few levels is hostile: then every ``<`` before a bar goes, so no token can form.
    for _ in range(8):
        new = PARTIAL_TOKEN_RE.sub("", IMAGE_TOKEN_RE.sub("", SPECIAL_TOKEN_RE.sub("", text)))
        if new == text:
            return text
        text = new
    # An entity, not an empty string: deleting a ``<`` could join a ``<`` and a bar again.
    return _LT_BEFORE_TOKEN_RE.sub("&lt;", text)


def has_eos(text: str) -> bool:
    """True when the text carries the end-of-sentence token (the model stopped by itself)."""
    return EOS_RE.search(text) is not None


def strip_eos(text: str) -> str:
    """``text`` without end-of-sentence tokens."""
    return EOS_RE.sub("", text)


def strip_prompt_echo(text: str) -> tuple[str, bool]:
    """Remove an echoed prompt (and the role/image tokens around it) from the start of ``text``."""
    m = PROMPT_ECHO_RE.match(text)
    if m is None:
        m = _LEADING_ROLE_RE.match(text)
    if m is None or m.end() == 0:
        return text, False
    return text[m.end() :].lstrip(" \t"), True
