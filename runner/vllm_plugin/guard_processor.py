"""The n-gram repetition guard as a vLLM v1 batch-level ``LogitsProcessor`` (engine stage).

A thin adapter: vLLM's ``BatchUpdate`` events go into ``runner.engines.guard.GuardState`` (numpy,
vectorised over the batch) and the banned (row, token) pairs are written into the logits with one
``index_put_``. Pass it to vLLM by name: ``logits_processors=[GUARD_FQCN]``.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from runner.engines.guard import GuardParams, GuardState, apply_bans


class NGramGuardLogitsProcessor(LogitsProcessor):
    """Upstream's no-repeat n-gram semantics, one vectorised check per step for the whole batch."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        GuardParams.from_extra_args(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.pin_memory = is_pin_memory
        self.state = GuardState()
        # Made once: a per-step torch.tensor(..., device=cuda) would synchronise the host with the GPU.
        self.neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=device)

    def is_argmax_invariant(self) -> bool:
        return False  # banning tokens changes the greedy choice

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self.state.update(
            batch_update.removed,
            ((i, params.extra_args, out) for i, params, _prompt, out in batch_update.added),
            ((a, b, d == MoveDirectionality.SWAP) for a, b, d in batch_update.moved),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # Token lists are read here, not in update_state: with async scheduling vLLM repairs the
        # -1 placeholders of the last step only right before sampling.
        rows, toks = self.state.banned()
        neg_inf = self.neg_inf if self.neg_inf.dtype == logits.dtype else self.neg_inf.to(logits.dtype)
        return apply_bans(logits, rows, toks, pin_memory=self.pin_memory, neg_inf=neg_inf)
