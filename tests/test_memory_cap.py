"""--gpu-memory-gib's hard cap on the engine core's PyTorch allocator (runner/vllm_plugin/memory_cap.py):
the CLI exports it, the spawned engine core applies it when vLLM builds our model class."""

from __future__ import annotations

import os

import pytest
import torch

from runner.engines import vllm_engine
from runner.vllm_plugin import memory_cap


def test_fraction_is_the_cap_over_the_card_and_never_above_one() -> None:
    assert memory_cap.fraction_for(5.2, 80 * 2**30) == pytest.approx(5.2 / 80)
    assert memory_cap.fraction_for(100, 80 * 2**30) == 1.0
    with pytest.raises(ValueError, match="must be positive"):
        memory_cap.fraction_for(0, 80 * 2**30)


def test_export_sets_and_clears_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memory_cap.ENV, raising=False)
    vllm_engine._export_memory_cap(5.2)
    assert os.environ[memory_cap.ENV] == "5.2"
    vllm_engine._export_memory_cap(None)  # an uncapped engine after a capped one: no leftover cap
    assert memory_cap.ENV not in os.environ


def test_apply_sets_the_allocator_fraction_on_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 8 * 2**30})()
    )
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    monkeypatch.setenv(memory_cap.ENV, "5.2")
    assert memory_cap.apply_from_env() == pytest.approx(5.2 / 8)
    assert calls == [(pytest.approx(5.2 / 8), 3)]
    monkeypatch.setenv(memory_cap.ENV, "")
    assert memory_cap.apply_from_env() is None and len(calls) == 1


def test_apply_without_cuda_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory_cap.ENV, "5.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory_cap.apply_from_env() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the real allocator limit")
def test_real_allocator_releases_its_cache_before_it_passes_the_cap() -> None:
    """On the GPU machine: with a cap, cached-but-free blocks are returned before the process grows
    past it, and an allocation that cannot fit under it fails instead of overrunning."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved(0)
    torch.cuda.set_per_process_memory_fraction((base + 2 * 2**30) / total, 0)
    try:
        a = torch.empty(int(1.5 * 2**30), dtype=torch.uint8, device="cuda")
        del a  # 1.5 GiB now cached, not free on the device
        # 1.8 GiB does not fit the cached 1.5 GiB block; cached + new would pass the cap, so the
        # allocator must give the cached block back first
        b = torch.empty(int(1.8 * 2**30), dtype=torch.uint8, device="cuda")
        assert torch.cuda.memory_reserved(0) <= base + 2 * 2**30
        del b
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(2.5 * 2**30), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
