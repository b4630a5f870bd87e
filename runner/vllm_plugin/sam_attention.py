"""SAM's relative-position attention without a materialised bias (engine stage, vLLM plugin).

Upstream (vLLM 0.26 ``deepencoder.py``, ``RelPosAttention``, from SAM/ViTDet) adds a decomposed
relative-position bias to every attention map: ``bias[i, j] = rel_h[i, row(j)] + rel_w[i, col(j)]``
with ``rel_h = q·Rh``, ``rel_w = q·Rw``. It builds that bias as a full (heads × HW × HW) tensor and
passes it to ``scaled_dot_product_attention`` as ``attn_mask``: for a 1024² view (64×64 tokens)
~400 MB per image and layer, written by a broadcast add, copied, then read by the
memory-efficient kernel, the only SDPA kernel that takes an arbitrary bias. Profiled on the H100
(GPU session 4, prefill steps of the PERF.md workload): those adds/copies and that kernel were
~67% of the GPU time of a prefill step, ~21 ms per Gundam page.

The same scores without the bias tensor: append the bias terms to the query and one-hot
positions to the key,

    q' = [q, rel_h / s, rel_w / s],   k' = [k, onehot(row(j)), onehot(col(j))],   v' = [v, 0]

so that ``s · q'·k'`` = ``s · q·k + rel_h[i, row(j)] + rel_w[i, col(j)]`` (``s`` = upstream's
scale, passed explicitly). The head dimension grows from 64 to 64 + H + W (192 for a 64×64 grid,
92 → 96 for 14×14 windows), which flash-attention kernels take (≤ 256), and no HW × HW tensor
is ever written. For head_dim 64, ``1/s`` = 8 is exact in bf16; the bias terms are summed in the
kernel's fp32 accumulator instead of being rounded to bf16 first as upstream does, so results
differ from upstream's in the last bits only (tests: ``tests/test_sam_attention.py`` on CPU
against a copy of upstream's forward, and on the GPU machine against upstream's own module).

GPU session 6's profile of this path (one 18-page step, H100): the widened heads triple the
attention's FLOPs (71 of 310 ms in the 64×64 global layers) and the concatenations/pads that build
q', k', v' cost another ~37 ms. Keeping 64-wide heads and adding the bias inside PyTorch's
FlexAttention (``score_mod`` reading rel_h/rel_w, compiled) was tried and measured in GPU session 7
(``tools/bench_sam.py``, 18 Gundam pages): **147.5 ms/page** against 17.3 here and 20.5 upstream;
its compiled kernel (~41 ms per call) dominated. Removed again; the numbers are in NOTES.md.

Since session 9 the widened attention stays token-major (the qkv projection's own layout: no
head-major copies of q, k, v and of the output), and on a Hopper GPU it runs vLLM's FA3 kernel
(``vllm.vllm_flash_attn``, varlen over the views; 192-wide keys with 128-wide values is a kernel
FA3 has for DeepSeek's MLA) instead of PyTorch's FA2. Measured (H100, 18 Gundam pages, same
weights and inputs): upstream 20.4, SDPA in this layout 16.4, FA3 14.0, cuDNN 14.0 ms/page.
``RUNNER_SAM_KERNEL`` (``auto``: FA3 where it can run, ``fa3``, ``sdpa``, ``cudnn``) picks it.

``RUNNER_FAST_SAM_ATTENTION=0`` keeps upstream's forward. (``torch.compile`` of the whole encoder
on top of this was measured in GPU session 6 and gave nothing: 17.2 -> 17.4 ms/page, 93 s of
compilation; ``tools/bench_sam.py --variants bias-free,bias-free+compile`` repeats it.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from typing import Any

import torch
import torch.nn.functional as F

_log = logging.getLogger("vllm.deepseek_ocr_pipeline")  # vLLM's handler prints it in the engine core
MAX_HEAD_DIM = 256  # flash-attention kernels (FA2 in PyTorch, cuDNN) stop here


def enabled() -> bool:
    return os.environ.get("RUNNER_FAST_SAM_ATTENTION", "1") != "0"


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Upstream's ``get_rel_pos`` (same operations, same order)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        dtype = rel_pos.dtype
        resized = F.interpolate(
            rel_pos.to(torch.float32).reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        ).to(dtype)
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative.long()]


def _key_positions(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(h*w, h+w): one-hot row then one-hot column of each key position."""
    idx = torch.arange(h * w, device=device)
    onehot = torch.zeros(h * w, h + w, dtype=dtype, device=device)
    onehot[idx, idx // w] = 1
    onehot[idx, h + idx % w] = 1
    return onehot


def kernel() -> str:
    """The attention kernel for the widened heads: ``RUNNER_SAM_KERNEL`` = ``auto`` (default: FA3
    where vLLM's build has it and the GPU is a Hopper, else SDPA), ``fa3``, ``sdpa`` or ``cudnn``
    (SDPA restricted to cuDNN's kernel)."""
    choice = os.environ.get("RUNNER_SAM_KERNEL", "auto")
    if choice != "auto":
        return choice
    global _auto_kernel
    if _auto_kernel is None:
        _auto_kernel = "fa3" if _fa3_available() else "sdpa"
    return _auto_kernel


_auto_kernel: str | None = None


def kernel_for(x: torch.Tensor) -> str:
    """``kernel()``, where it can run these tensors: FA3 and cuDNN take CUDA half/bf16 only."""
    name = kernel()
    if name in ("fa3", "cudnn") and not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return "sdpa"
    return name


def _fa3_available() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

        return bool(is_fa_version_supported(3))
    except Exception:  # no vLLM, or a build without FA3
        return False


def head_dims(d: int, extra: int, kernel_name: str) -> tuple[int, int]:
    """(query/key, value) head dims for a head of ``d`` plus ``extra`` bias columns: a multiple of
    8 (flash kernels); for FA3 the sizes it compiles (64, 96, 128, 192, 256; values of 128 beside
    192-wide keys is its DeepSeek-MLA kernel), with values padded only as far as the kernel needs."""
    dim = d + extra
    dq = dim + (-dim) % 8
    if kernel_name != "fa3":
        return dq, dq
    dq = next(s for s in (64, 96, 128, 192, 256) if s >= dim) if dim <= 256 else dq
    return dq, 128 if dq == 192 and d <= 128 else dq


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
    positions: torch.Tensor | None = None,
    kernel_name: str = "sdpa",
) -> torch.Tensor:
    """softmax(scale·q·kᵀ + rel_h[i, row(j)] + rel_w[i, col(j)]) v, token-major: q, k, v
    (B, L, heads, d), rel_h (B, L, heads, h), rel_w (B, L, heads, w), L = h*w, any strides with
    the last dimension contiguous (views of the qkv projection). Returns (B, L, heads, d),
    possibly a strided view."""
    b, seq, nh, d = q.shape
    h, w = rel_h.shape[-1], rel_w.shape[-1]
    extra = h + w
    dq, dv = head_dims(d, extra, kernel_name)
    if positions is None:
        positions = _key_positions(h, w, q.dtype, q.device)
    inv = 1.0 / scale
    parts_q = [q, rel_h * inv, rel_w * inv]
    parts_k = [k, positions[None, :, None, :].expand(b, seq, nh, extra)]
    if dq > d + extra:
        zq = q.new_zeros(b, seq, nh, dq - d - extra)
        parts_q.append(zq)
        parts_k.append(zq)
    qa = torch.cat(parts_q, dim=-1)
    ka = torch.cat(parts_k, dim=-1)
    va = F.pad(v, (0, dv - d))
    return attend(qa, ka, va, scale, kernel_name)[..., :d]


def attend(
    qa: torch.Tensor, ka: torch.Tensor, va: torch.Tensor, scale: float, kernel_name: str
) -> torch.Tensor:
    """softmax(scale·qa·kaᵀ)·va over each image's tokens, token-major: qa, ka (B, L, heads, dq),
    va (B, L, heads, dv), contiguous in the last dimension. Returns (B, L, heads, dv); for FA3 a
    contiguous tensor, else a transposed view."""
    b, seq, nh, dq = qa.shape
    dv = va.shape[-1]
    if kernel_name == "fa3":
        from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

        cu = torch.arange(0, (b + 1) * seq, seq, dtype=torch.int32, device=qa.device)
        out = flash_attn_varlen_func(
            qa.view(b * seq, nh, dq),
            ka.view(b * seq, nh, dq),
            va.view(b * seq, nh, dv),
            max_seqlen_q=seq,
            cu_seqlens_q=cu,
            max_seqlen_k=seq,
            cu_seqlens_k=cu,
            softmax_scale=scale,
            causal=False,
            fa_version=3,
        )
        return out.view(b, seq, nh, dv)  # type: ignore[no-any-return]
    # SDPA wants (B, heads, L, D): transposed views, no copy
    ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if kernel_name == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    with ctx:
        out = F.scaled_dot_product_attention(
            qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), scale=scale
        )
    return out.transpose(1, 2)


def rel_pos_tables(attn: Any, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_rel_pos`` for both axes of ``attn`` (a ``RelPosAttention``), cached on the module per
    grid. The tables depend only on the grid and the two parameters, which inference never
    changes, yet computing them is ~10 small ops per axis per block per encoder call: 5-6% of an
    engine core's busy host time in a prefill step (GPU session 13). The cache is keyed by the
    parameters' storage and version counters (a weight reload or an in-place update recomputes)
    and is bypassed when autograd could need the graph."""
    ph, pw = attn.rel_pos_h, attn.rel_pos_w
    if torch.is_grad_enabled() and (ph.requires_grad or pw.requires_grad):
        return get_rel_pos(h, h, ph), get_rel_pos(w, w, pw)
    # Global blocks see two grids per step (the 1024² view's and the 640² crops'): one entry per
    # grid, each replaced when the parameters change.
    sig = (ph.data_ptr(), pw.data_ptr(), ph._version, pw._version, ph.dtype, ph.device)
    cache = attn.__dict__.setdefault("_runner_rel_pos", {})
    hit = cache.get((h, w))
    if hit is None or hit[0] != sig:
        hit = cache[(h, w)] = (sig, (get_rel_pos(h, h, ph), get_rel_pos(w, w, pw)))
    return hit[1]  # type: ignore[no-any-return]


def fast_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Drop-in ``RelPosAttention.forward``: upstream's projections, the bias folded into the
    query/key (module docstring), token-major throughout (the qkv projection's layout: no
    head-major copies of q, k, v or of the output). Falls back to upstream's forward where the
    widened head would not fit a flash kernel."""
    bsz, h, w, _ = x.shape
    nh = self.num_heads
    head_dim = self.qkv.out_features // 3 // nh
    if not self.use_rel_pos or head_dim + h + w + 8 > MAX_HEAD_DIM:
        return self._upstream_forward(x)
    q, k, v = self.qkv(x).view(bsz, h, w, 3, nh, head_dim).unbind(3)  # (B, h, w, heads, d) views
    rh, rw = rel_pos_tables(self, h, w)
    rel_h = torch.einsum("byxnc,ykc->byxnk", q, rh)  # upstream's einsums, token-major
    rel_w = torch.einsum("byxnc,xkc->byxnk", q, rw)
    key = (h, w, q.dtype, q.device)
    cache = self.__dict__.setdefault("_runner_positions", {})
    positions = cache.get(key)
    if positions is None:
        positions = cache[key] = _key_positions(h, w, q.dtype, q.device)
    seq = h * w
    out = rel_pos_attention(
        q.reshape(bsz, seq, nh, head_dim),
        k.reshape(bsz, seq, nh, head_dim),
        v.reshape(bsz, seq, nh, head_dim),
        rel_h.reshape(bsz, seq, nh, h),
        rel_w.reshape(bsz, seq, nh, w),
        self.scale,
        positions,
        kernel_for(x),
    )
    return self.proj(out.reshape(bsz, h, w, nh * head_dim))  # type: ignore[no-any-return]


def patch_sam_attention(module: torch.nn.Module) -> int:
    """Give every ``RelPosAttention`` under ``module`` the fast forward (instance attribute; the
    class and other models are untouched). Returns how many were patched."""
    if not enabled():
        return 0
    n = 0
    for m in module.modules():
        if type(m).__name__ == "RelPosAttention" and getattr(m, "use_rel_pos", False):
            if "_upstream_forward" not in m.__dict__:
                m.__dict__["_upstream_forward"] = m.forward
                m.__dict__["forward"] = types.MethodType(fast_forward, m)
                n += 1
    return n
