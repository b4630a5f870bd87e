"""A hard cap on the engine core's PyTorch allocator for ``--gpu-memory-gib`` (issue 11).

vLLM's ``gpu_memory_utilization`` is a budget it plans with, not a limit: GPU session 5 (H100,
low-VRAM profile) measured the engine core at 6.24 GiB with a 6 GiB run budget (vLLM given 4.30)
while the same settings at 8 GiB stayed 0.86 GiB over vLLM's count, i.e. something beyond
vLLM's accounting grew by ~1 GiB in the small run (where: not yet known; the bench now splits the
peak into start-up and run). PyTorch's caching allocator can be held to a fraction of the card
(``torch.cuda.set_per_process_memory_fraction``); past it the allocator first returns its cached
blocks and retries, and only then raises out-of-memory. So cached-but-free memory can no longer
push the process over the cap, and a real shortage is a clear error instead of a silent overrun.

The CLI sets ``RUNNER_TORCH_MEMORY_CAP_GIB`` (the run's budget minus what the process holds
outside the allocator: CUDA context ~0.52 GiB and ~0.24 GiB of other non-torch memory, measured)
before it starts vLLM; the spawned engine core inherits it and our model classes apply it when
vLLM builds them (the worker's device is set by then, the weights not yet loaded).
``RUNNER_TORCH_MEMORY_CAP_GIB`` unset or empty: no cap.

Measured with the cap (GPU session 6, H100, ``--gpu-memory-gib 6`` / ``8``, allocator capped at
5.2 / 7.2 GiB): engine-core process peaks 5.84 / 7.12 GiB (NVML), both runs complete.
"""

from __future__ import annotations

import logging
import os

ENV = "RUNNER_TORCH_MEMORY_CAP_GIB"  # its value: runner.profiles.allocator_cap_for

_log = logging.getLogger(__name__)


def fraction_for(cap_gib: float, total_bytes: int) -> float:
    """The allocator fraction of a ``total_bytes`` card that ``cap_gib`` GiB is (at most 1)."""
    if cap_gib <= 0:
        raise ValueError(f"{ENV} must be positive, got {cap_gib:g}")
    return min(1.0, cap_gib * 2**30 / total_bytes)


def apply_from_env() -> float | None:
    """Cap this process's PyTorch CUDA allocator as ``RUNNER_TORCH_MEMORY_CAP_GIB`` says; returns the
    fraction set, or None (no variable, or no CUDA)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(dev).total_memory
    frac = fraction_for(float(raw), total)
    torch.cuda.set_per_process_memory_fraction(frac, dev)
    _log.info(
        "PyTorch allocator capped at %.2f GiB (%.4f of %.1f GiB, %s): past it cached blocks are "
        "released before anything grows",
        float(raw),
        frac,
        total / 2**30,
        ENV,
    )
    return frac
