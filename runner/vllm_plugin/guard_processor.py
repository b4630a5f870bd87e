"""The n-gram repetition guard as a vLLM v1 batch-level ``LogitsProcessor`` (engine stage).

A thin adapter: vLLM's ``BatchUpdate`` events go into a guard state and the banned (row, token)
pairs are set to -inf in the logits. Two states with identical bans (``tests/test_guard.py``):
- ``DeviceGuardState`` (``runner/engines/guard_torch.py``, the default): histories on the GPU,
  the search is queued behind the forward pass; the host only does bookkeeping.
- ``GuardState`` (``runner/engines/guard.py``): numpy on the host; kept as the reference
  implementation and for A/B runs. A request selects it with ``extra_args["guard_backend"] =
  "host"`` (``RUNNER_GUARD_BACKEND=host`` makes it the default for every request).
Pass it to vLLM by name: ``logits_processors=[GUARD_FQCN]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from runner.engines.guard import GuardParams, GuardState, apply_bans
from runner.engines.guard_torch import DeviceGuardState

BACKEND_KEY = "guard_backend"  # extra_args key: "device" (default) or "host"


class NGramGuardLogitsProcessor(LogitsProcessor):
    """Upstream's no-repeat n-gram semantics, one vectorised check per step for the whole batch."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        GuardParams.from_extra_args(sampling_params.extra_args)
        backend = (sampling_params.extra_args or {}).get(BACKEND_KEY)
        if backend not in (None, "device", "host"):
            raise ValueError(f"{BACKEND_KEY} must be 'device' or 'host', got {backend!r}")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.pin_memory = is_pin_memory
        self.default_backend = os.environ.get("RUNNER_GUARD_BACKEND", "device")
        self.host = GuardState()
        self.dev = DeviceGuardState(device, pin_memory=is_pin_memory)
        # Made once: a per-step torch.tensor(..., device=cuda) would synchronise the host with the GPU.
        self.neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=device)

    def is_argmax_invariant(self) -> bool:
        return False  # banning tokens changes the greedy choice

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        host_added: list[tuple[int, Mapping[str, Any] | None, list[int]]] = []
        dev_added: list[tuple[int, Mapping[str, Any] | None, list[int]]] = []
        for i, params, _prompt, out in batch_update.added:
            extra = params.extra_args if params is not None else None
            backend = (extra or {}).get(BACKEND_KEY, self.default_backend)
            (host_added if backend == "host" else dev_added).append((i, extra, out))
        moved = [(a, b, d == MoveDirectionality.SWAP) for a, b, d in batch_update.moved]
        removed = list(batch_update.removed)
        # Every index event goes to both states: an index added to one replaces whatever the
        # other held there (the other drops it), exactly as a removal would.
        self.host.update(removed + [i for i, _, _ in dev_added], host_added, moved)
        self.dev.update(removed + [i for i, _, _ in host_added], dev_added, moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # Token lists are read here, not in update_state: with async scheduling vLLM repairs the
        # -1 placeholders of the last step only right before sampling.
        if self.host.rows:
            rows, toks = self.host.banned()
            neg_inf = self.neg_inf if self.neg_inf.dtype == logits.dtype else self.neg_inf.to(logits.dtype)
            apply_bans(logits, rows, toks, pin_memory=self.pin_memory, neg_inf=neg_inf)
        return self.dev.apply(logits)
