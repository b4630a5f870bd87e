"""DeepSeek-OCR-2's encoder attention mask, built in a few tensor operations (vLLM plugin).

OCR-2's vision encoder (vLLM 0.26 ``deepencoder2.py``, ``CustomQwen2Decoder``) runs a Qwen2
decoder over ``[image tokens, learned queries]``: image tokens attend to each other (non-causal),
queries attend to all image tokens and causally to the queries before them. Upstream builds that
(B, 1, L, L) mask in ``_create_custom_4d_mask`` with a Python loop: per view in the batch, per
query position, two indexed assignments into a tensor on the GPU with index tensors on the host
(``token_type_ids`` is made on the CPU). A Gundam page is one 1024² view (256 queries) and up to
six 768² crops (144 each): ~2,200 indexed writes, each a host-to-device copy and a kernel, per
page, on the thread that drives the GPU. GPU session 6 (H100, two engines): OCR-2 prefill steps
took ~5 s each and 512 pages did not finish in 400 s, where OCR-1 (no such loop) runs 12.7 pages/s.

Here the same mask comes from comparisons of the type ids and of the queries' ranks (a cumulative
sum), for all views at once: ``allowed[q, k] = img[k] & (img[q] | txt[q]) | txt[q] & txt[k] &
rank[k] <= rank[q]``; allowed entries are 0, the others the dtype's minimum, as upstream. Equal
(exactly) to a copy of upstream's loop (CPU tests); vLLM's own encoder gives a bit-identical output
with it (checked on the CPU box with vLLM's Python sources; ``tests/test_encoder_mask.py`` repeats
that on the GPU machine: passed in GPU session 7). The loop took 185 ms per 32-crop chunk on the
CPU box, this 14 ms; GPU session 7's OCR-2 prefill steps took ~0.4 s instead of ~5 s.
``RUNNER_FAST_ENCODER_MASK=0`` keeps upstream's loop.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch


def enabled() -> bool:
    return os.environ.get("RUNNER_FAST_ENCODER_MASK", "1") != "0"


def custom_4d_mask(
    sequence_length: int,
    dtype: torch.dtype,
    device: torch.device | str,
    batch_size: int,
    token_type_ids: torch.Tensor,
) -> torch.Tensor:
    """Upstream's mask: (batch, 1, L, L), 0 where attention is allowed, ``finfo(dtype).min``
    elsewhere. ``token_type_ids`` (batch, L): 0 = image token (non-causal), 1 = query (causal)."""
    t = token_type_ids[:batch_size, :sequence_length].to(device)
    img = t == 0
    txt = t == 1
    rank = torch.cumsum(txt, dim=1)  # a query's 1-based rank among the queries of its view
    causal = rank[:, None, :] <= rank[:, :, None]  # [b, q, k]: k's rank <= q's
    allowed = img[:, None, :] & (img | txt)[:, :, None]
    allowed |= txt[:, :, None] & txt[:, None, :] & causal
    mask = torch.full(
        (batch_size, sequence_length, sequence_length), torch.finfo(dtype).min, dtype=dtype, device=device
    )
    return mask.masked_fill_(allowed, 0.0).unsqueeze(1)


def _fast_method(
    self: Any,
    sequence_length: int,
    dtype: torch.dtype,
    device: torch.device | str,
    batch_size: int,
    token_type_ids: torch.Tensor,
) -> torch.Tensor:
    if token_type_ids.shape[0] < batch_size or token_type_ids.shape[1] != sequence_length:
        return self._runner_upstream_mask(sequence_length, dtype, device, batch_size, token_type_ids)  # type: ignore[no-any-return]
    return custom_4d_mask(sequence_length, dtype, device, batch_size, token_type_ids)


def patch_encoder_mask(module: torch.nn.Module) -> int:
    """Give every submodule with upstream's ``_create_custom_4d_mask`` the vectorised one
    (instance attribute; classes untouched). Returns how many were patched."""
    if not enabled():
        return 0
    n = 0
    for m in module.modules():
        if callable(getattr(m, "_create_custom_4d_mask", None)) and "_runner_upstream_mask" not in m.__dict__:
            m.__dict__["_runner_upstream_mask"] = m._create_custom_4d_mask
            m.__dict__["_create_custom_4d_mask"] = types.MethodType(_fast_method, m)
            n += 1
    return n
