"""Input discovery and output naming.

Output names mirror the input's path relative to the input root (so ``a/x.pdf`` and ``b/x.pdf``
never collide), made safe: no component can be ``..`` or absolute, control/bidi characters and
path separators are replaced, Unicode is NFC-normalised, each component is at most
``MAX_COMPONENT`` bytes. Whenever sanitising changed a name, a short hash of the original
relative path is appended, so two different inputs can never map to the same output. The mapping
depends only on the relative path: every shard and machine computes the same name.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import regex

MAX_COMPONENT = 120  # bytes (UTF-8); leaves room for suffixes under the usual 255-byte limit
_UNSAFE = regex.compile(r"[^\p{L}\p{N}\p{M}._\- +()\[\],&@=]")


@dataclass(frozen=True)
class InputDoc:
    doc_key: str  # unique within the run: the relative path as given
    rel: str  # path relative to the input storage root ("/" separators)
    output_stem: str  # safe output path relative to the output root, without suffix


def _clip_utf8(s: str, limit: int) -> str:
    b = s.encode("utf-8")
    if len(b) <= limit:
        return s
    return b[:limit].decode("utf-8", errors="ignore")


def _safe_component(c: str) -> str:
    c = unicodedata.normalize("NFC", c)
    c = "".join(ch for ch in c if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    c = _UNSAFE.sub("_", c).strip(" .")
    c = c.lstrip("-")
    return _clip_utf8(c, MAX_COMPONENT) or "_"


def output_stem_for(rel: str) -> str:
    """Safe output stem (relative path without suffix) for an input's relative path."""
    rel_norm = rel.replace("\\", "/")
    parts = [p for p in rel_norm.split("/") if p not in ("", ".", "..")]
    if not parts:
        parts = ["document"]
    stem_last = parts[-1]
    if stem_last.lower().endswith(".pdf"):
        stem_last = stem_last[: -len(".pdf")]
    raw_parts = [*parts[:-1], stem_last]
    safe_parts = [_safe_component(p) for p in raw_parts]
    # Compare with the name as given: a backslash turned into a folder separator is a change too,
    # so "a\\b.pdf" and "a/b.pdf" can never share an output.
    changed = safe_parts != raw_parts or parts != rel.split("/")
    if changed:
        digest = hashlib.sha1(rel.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe_parts[-1] = f"{_clip_utf8(safe_parts[-1], MAX_COMPONENT - 9)}-{digest}"
    return "/".join(safe_parts)


def docs_from_rels(rels: list[str]) -> list[InputDoc]:
    seen: dict[str, str] = {}
    docs = []
    for rel in sorted(set(rels)):
        stem = output_stem_for(rel)
        if stem.lower() in seen:  # case-insensitive filesystems: disambiguate deterministically
            digest = hashlib.sha1(rel.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            stem = f"{stem}-{digest}"
        seen[stem.lower()] = rel
        docs.append(InputDoc(doc_key=rel, rel=rel, output_stem=stem))
    return docs


def read_input_list(list_file: str) -> list[str]:
    """Paths from a list file: one per line, ``#`` comments and blank lines ignored, relative
    paths taken relative to the list file's folder."""
    base = Path(list_file).resolve().parent
    out = []
    for line in Path(list_file).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        out.append(str(p if p.is_absolute() else (base / p)))
    return out


def common_root(paths: list[str]) -> str:
    """The deepest folder containing every path (for naming outputs of --input-list runs)."""
    if not paths:
        return "."
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return os.path.commonpath(parents)
