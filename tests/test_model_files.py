"""Tests for runner/model_files.py: local folders, a huggingface_hub cache used offline, missing models."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from runner.adapters import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from runner.engines.base import EngineUnavailable
from runner.model_files import ModelFiles, ModelNotFound, looks_like_repo_id, resolve_model

OCR2_CONFIG = {"architectures": ["DeepseekOCR2ForCausalLM"], "model_type": "deepseek_vl_v2"}
OCR1_CONFIG = {"architectures": ["DeepseekOCRForCausalLM"], "model_type": "deepseek_vl_v2"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _checkpoint(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not really weights")
    return folder


def _hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay files out the way huggingface_hub does: blobs by hash, snapshot symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / name)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "my model", OCR2_CONFIG)
    files = resolve_model(str(folder))
    assert isinstance(files, ModelFiles)
    assert files.path == str(folder.resolve())
    assert files.config == OCR2_CONFIG
    assert files.adapter is DEEPSEEK_OCR_2


def test_local_folder_without_config_says_what_to_pass(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelNotFound, match=r"config\.json"):
        resolve_model(str(tmp_path / "weights"))


def test_local_folder_with_foreign_config_is_rejected(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "llama", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(ModelNotFound, match="not a DeepSeek-OCR model"):
        resolve_model(str(folder))


def test_missing_path_that_is_no_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such folder"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))


def test_repo_id_shape() -> None:
    assert looks_like_repo_id("deepseek-ai/DeepSeek-OCR-2")
    assert not looks_like_repo_id("./models/x")
    assert not looks_like_repo_id("/abs/path")
    assert not looks_like_repo_id("a/b/c")


def test_offline_hub_cache_is_found(tmp_path: Path, offline: None) -> None:
    config = json.dumps(OCR1_CONFIG).encode()
    files_in_repo = {"config.json": config, "model.safetensors": b"w"}
    snapshot = _hub_cache(tmp_path / "hub", "acme/tiny-ocr", files_in_repo)
    files = resolve_model("acme/tiny-ocr", cache_dir=str(tmp_path / "hub"))
    assert Path(files.path) == snapshot.resolve()
    assert (Path(files.path) / "model.safetensors").read_bytes() == b"w"
    assert files.adapter is DEEPSEEK_OCR
    assert files.config == OCR1_CONFIG


def test_offline_missing_model_explains_what_to_do(tmp_path: Path, offline: None) -> None:
    _hub_cache(tmp_path / "hub", "acme/other", {"config.json": json.dumps(OCR2_CONFIG).encode()})
    with pytest.raises(ModelNotFound) as err:
        resolve_model("acme/not-downloaded", cache_dir=str(tmp_path / "hub"))
    msg = str(err.value)
    assert isinstance(err.value, EngineUnavailable)
    assert "HF_HUB_OFFLINE" in msg
    assert "hf download acme/not-downloaded --cache-dir" in msg
    assert "--model /local/folder" in msg


def test_unreachable_hub_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(ModelNotFound, match=r"the hub could not be reached \(") as err:
        resolve_model("acme/nowhere", cache_dir=str(tmp_path / "hub"))
    assert "hf download acme/nowhere" in str(err.value) and "--model /local/folder" in str(err.value)


def test_cached_model_is_used_when_hub_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    snapshot = _hub_cache(tmp_path / "hub", "acme/cached", {"config.json": json.dumps(OCR2_CONFIG).encode()})
    files = resolve_model("acme/cached", cache_dir=str(tmp_path / "hub"))
    assert Path(files.path) == snapshot.resolve()
    assert files.adapter is DEEPSEEK_OCR_2
