"""JSON for output files that browsers and other tools may read.

Model text is arbitrary: it can contain ``<script>``, event handlers or ``javascript:`` URLs. In
our JSON outputs (page records, regions, summaries, done markers) those characters are written as
JSON escapes (``\\u003c``, ``\\u003e``, ``\\u0026``, ``\\u003a``, ``\\u003d``), so the files decode
to exactly the same strings but never contain active markup, even when embedded in HTML.
"""

from __future__ import annotations

import json
from typing import Any

import regex

_JS_URL = regex.compile(r"(?i)(javascript|vbscript|data)(\s*):")
_EVENT = regex.compile(r"(?i)\b(on[a-z]+)(\s*)=")


def safe_dumps(obj: Any, indent: int | None = None) -> str:
    s = json.dumps(obj, ensure_ascii=False, indent=indent)
    s = s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    # Structural ':' of JSON never follows these words and '=' is never structural, so only
    # characters inside string values are escaped.
    s = _JS_URL.sub(lambda m: f"{m.group(1)}{m.group(2)}\\u003a", s)
    return _EVENT.sub(lambda m: f"{m.group(1)}{m.group(2)}\\u003d", s)
