"""Engines: text layer, vLLM, Transformers. Imported lazily: creating one engine never imports
another engine's heavy dependencies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.engines.base import BatchEngine, Engine, EngineDied, EngineUnavailable

if TYPE_CHECKING:
    from runner.config import RunConfig

__all__ = ["BatchEngine", "Engine", "EngineDied", "EngineUnavailable", "create_engine"]


def create_engine(config: RunConfig) -> Engine:
    """The engine named by ``config.engine``. Raises ``EngineUnavailable`` at once (before any
    model loads) when it cannot run here."""
    if config.engine == "text":
        from runner.engines.text_engine import TextEngine

        return TextEngine(config)
    if config.engine == "vllm":
        try:
            from runner.engines.vllm_engine import VllmEngine
        except ImportError as e:  # the module itself imports vllm lazily; this is a packaging error
            raise EngineUnavailable(f"vLLM engine module failed to import: {e}") from e
        return VllmEngine(config)
    if config.engine == "hf":
        try:
            from runner.engines.hf_engine import HfEngine
        except ImportError as e:
            raise EngineUnavailable(f"Transformers engine module failed to import: {e}") from e
        return HfEngine(config)
    raise EngineUnavailable(f"unknown engine {config.engine!r}")
