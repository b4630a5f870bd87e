"""Engine start-up stage: find a model's files on disk and pick its adapter.

In: the ``--model`` value (a local folder or a Hugging Face hub id) and an optional cache dir.
Out: ``ModelFiles`` (folder path, parsed ``config.json``, the ``ModelAdapter``) for the vLLM and
Transformers engines. Hub ids are fetched with ``huggingface_hub.snapshot_download``; with
``HF_HUB_OFFLINE=1`` only the local cache is used. Anything missing raises ``ModelNotFound``,
whose message says how to get the model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.adapters import ModelAdapter, adapter_for_config
from runner.engines.base import EngineUnavailable

# Only what an engine reads; upstream repos also carry demo images and PDFs.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "true", "yes", "on"}


class ModelNotFound(EngineUnavailable):
    """The model is not on this machine and could not be fetched; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    """A model folder ready to load: its path, its ``config.json`` and the adapter it selects."""

    path: str
    config: dict[str, Any]
    adapter: ModelAdapter


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, read at call time (huggingface_hub reads it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.startswith((".", "~"))


def resolve_model(model: str, cache_dir: str | None = None) -> ModelFiles:
    """Return the files of ``model`` (a local folder, or a hub id fetched/cached by huggingface_hub)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return _load_folder(local, model)
    if not looks_like_repo_id(model):
        raise ModelNotFound(
            f"--model {model!r}: no such folder, and it is not a hub id (owner/name). "
            "Pass a folder holding config.json and the weights, or a hub id such as "
            "deepseek-ai/DeepSeek-OCR-2."
        )
    return _load_folder(Path(_download(model, cache_dir)), model)


def _download(repo_id: str, cache_dir: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a core dependency
        raise ModelNotFound(f"huggingface_hub is not installed ({e}); pip install huggingface-hub") from e
    offline = hub_offline()
    try:
        return str(
            snapshot_download(
                repo_id,
                cache_dir=cache_dir,
                local_files_only=offline,
                allow_patterns=list(ALLOW_PATTERNS),
            )
        )
    except LocalEntryNotFoundError as e:
        raise ModelNotFound(_missing_message(repo_id, cache_dir, offline, e)) from e
    except HfHubHTTPError as e:  # repo not found, gated, auth
        raise ModelNotFound(
            f"could not fetch {repo_id!r} from the Hugging Face hub: {e}. Check the id, log in with "
            f"`hf auth login` if the repo is gated, or pass --model /local/folder."
        ) from e


def _missing_message(repo_id: str, cache_dir: str | None, offline: bool, err: Exception) -> str:
    where = f" (cache dir {cache_dir})" if cache_dir else ""
    cache_opt = f" --cache-dir {cache_dir}" if cache_dir else ""
    why = (
        "HF_HUB_OFFLINE is set and the model is not in the local cache"
        if offline
        else (f"it is not in the local cache and the hub could not be reached ({type(err).__name__})")
    )
    return (
        f"model {repo_id!r} is not available{where}: {why}. Download it once on a machine with network "
        f"access with `hf download {repo_id}{cache_opt}` (then copy the cache or use HF_HUB_OFFLINE=1), "
        f"unset HF_HUB_OFFLINE to let the runner download it, or pass --model /local/folder pointing at a "
        f"folder with config.json and the weights."
    )


def _load_folder(folder: Path, model: str) -> ModelFiles:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFound(
            f"--model {model!r}: {folder} has no config.json; point --model at the model folder itself "
            "(the one holding config.json, the tokenizer and *.safetensors)."
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelNotFound(f"--model {model!r}: cannot read {cfg_path}: {e}") from e
    if not isinstance(config, dict):
        raise ModelNotFound(f"--model {model!r}: {cfg_path} is not a JSON object")
    try:
        adapter = adapter_for_config(config)
    except ValueError as e:
        raise ModelNotFound(f"--model {model!r}: {e}") from e
    return ModelFiles(path=str(folder.resolve()), config=config, adapter=adapter)
