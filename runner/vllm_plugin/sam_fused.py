"""SAM's transformer blocks with the widened-head attention built by two Triton kernels (engine
stage, vLLM plugin).

``sam_attention`` folds SAM's relative-position bias into widened heads (q' = [q, rel_h/s,
rel_w/s], k' = [k, one-hot row, one-hot column], v' = [v, 0]) and builds q', k', v' with PyTorch:
two einsums (each copies q into a matmul layout and its result back), two scalings, two
concatenations and a pad per layer, plus, in the windowed blocks, upstream's window partition and
unpartition (a pad and two permute copies of the whole activation). Profiled on the H100 (GPU
session 9, ``tools/bench_sam.py --tower --profile``, 18 Gundam pages): the concatenations
(``CatArrayBatchedCopy``, 44 ms) and strided copies (``elementwise_kernel``, 51 ms) were a third
of the tower's 285 ms; its GEMMs 65 ms and its attention 38 ms.

Here each block runs as upstream's ``Block.forward`` does (norm1, attention, residual, norm2,
MLP, residual), with the attention in four steps:

1. upstream's ``qkv`` projection over the block's *unpartitioned* tokens;
2. ``_widen_rows`` (one program per window, window row and head) reads a row of q, k, v and writes
   q' (q, then ``q·Rh[row]`` scaled; ``tl.dot``), k' (k and its one-hot position) and v'; and
   ``_widen_cols`` (per window column) writes q''s ``q·Rw[col]`` part. Windows are read straight
   from the unpartitioned projection: a token outside the image (upstream pads the normalised
   input with zeros before the projection) is the projection's bias, which is what upstream's
   projection gives a zero row;
3. the same attention kernel as ``sam_attention`` (FA3 on Hopper) over each window;
4. ``_unwiden`` writes each window's output back to the image's raster order, without the pad
   tokens and the value padding, for upstream's ``proj``.

So no einsum copy, concatenation, scaling pass, partition or unpartition remains, and the
projections skip the pad tokens. A global block is the case of one window the size of the image.

Equal to upstream's block up to accumulation order: the bias terms are fp32 dot products scaled
then rounded once (upstream rounds the product, then scales; the same for SAM's scale 1/8, a
power of two). Tests: ``tests/test_sam_fused.py`` (CPU, Triton's interpreter, float32/float64,
against a copy of upstream's block and the PyTorch path) and the GPU machine (bf16, against
vLLM's own modules).

``RUNNER_SAM_FUSED``: ``auto`` (default: where the tensors are CUDA half/bf16 and Triton
imports), ``0`` (off: ``sam_attention``'s PyTorch path), ``1`` (wherever Triton runs, e.g. on the
CPU under ``TRITON_INTERPRET=1``: the tests).
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

from runner.vllm_plugin import sam_attention as sa

try:  # Triton comes with vLLM's CUDA builds; absent on the CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None
HAVE_TRITON = triton is not None


#: Largest window side (a global block's grid) on the fused path: the sizes run on the GPU
#: (64×64 for 1024² views, 40×40 for 640² crops, 14×14 windows). Larger grids (80×80: the Large
#: mode's 1280² views) keep the PyTorch path: their 128-row tiles were never compiled on a GPU.
MAX_GRID = 64


def mode() -> str:
    return os.environ.get("RUNNER_SAM_FUSED", "auto")


def _warps() -> int:
    """Warps per program of the three kernels: ``RUNNER_SAM_FUSED_WARPS``, else Triton's default
    4 (what GPU session 11 measured). Its warps sweep reached only ``_unwiden`` (11.34 / 11.36 /
    11.39 ms/page at 4 / 2-for-small-tiles / 8: no difference); the widening kernels' warps are
    not swept yet."""
    env = os.environ.get("RUNNER_SAM_FUSED_WARPS")
    return int(env) if env else 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _window_tokens(
        bw,
        line,
        NWH,
        NWW,
        Hs,
        Ws,
        WH: tl.constexpr,
        WW: tl.constexpr,
        ALONG_X: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # type: ignore[no-untyped-def]
        """The tokens of one line of window ``bw``: a row (``ALONG_X``: tokens along x) or a
        column. Returns (image index, source row, source column, in-window, in-image masks, token
        index within the window)."""
        per = NWH * NWW
        bs = bw // per
        r = bw % per
        wy = r // NWW
        wx = r % NWW
        j = tl.arange(0, BLOCK)
        if ALONG_X:
            y = line + j * 0
            x = j
            inwin = j < WW
        else:
            y = j
            x = line + j * 0
            inwin = j < WH
        sy = wy * WH + y
        sx = wx * WW + x
        valid = inwin & (sy < Hs) & (sx < Ws)
        return bs, sy, sx, inwin, valid, y * WW + x

    @triton.jit
    def _load_head(
        qkv,
        bias,
        bs,
        sy,
        sx,
        inwin,
        valid,
        part,
        n,
        Hs,
        Ws,
        NH: tl.constexpr,
        D: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):  # type: ignore[no-untyped-def]
        """(BLOCK, D): head ``n`` of q/k/v (``part`` 0/1/2) for the tokens; a pad token (in the
        window, outside the image) is the projection's bias, i.e. upstream's projection of the
        zero row it pads with."""
        c = tl.arange(0, D)
        tok = ((bs * Hs + sy) * Ws + sx).to(tl.int64)
        val = tl.load(
            qkv + tok[:, None] * (3 * NH * D) + part * NH * D + n * D + c[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        if HAS_BIAS:
            b = tl.load(bias + part * NH * D + n * D + c)
            pad = inwin & (valid == 0)
            val = tl.where(pad[:, None], b[None, :], val)
        return val

    @triton.jit
    def _rel_terms(q, table, line, K: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, inv):  # type: ignore[no-untyped-def]
        """``q·table[line]ᵀ·inv`` for the tokens of one window line: (tokens, BK) in the fp32
        accumulator, columns from K on zero (``table``: the (K, K, D) rel-pos table)."""
        c = tl.arange(0, D)
        kk = tl.arange(0, BK)
        t = tl.load(table + (line * K + kk)[:, None] * D + c[None, :], mask=(kk < K)[:, None], other=0.0)
        return tl.dot(q, tl.trans(t), input_precision="ieee") * inv

    @triton.jit
    def _widen_rows(  # type: ignore[no-untyped-def]
        qkv,
        bias,
        rh,
        qa,
        ka,
        va,
        Hs,
        Ws,
        NWH,
        NWW,
        inv,
        NH: tl.constexpr,
        D: tl.constexpr,
        WH: tl.constexpr,
        WW: tl.constexpr,
        BW: tl.constexpr,
        BH: tl.constexpr,
        DQ: tl.constexpr,
        DV: tl.constexpr,
        EQ: tl.constexpr,
        EV: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        """Program (window, row, head): q and ``q·Rh[row]·inv`` into q', all of k' and v'."""
        bw = tl.program_id(0)
        y = tl.program_id(1)
        n = tl.program_id(2)
        bs, sy, sx, inwin, valid, t = _window_tokens(bw, y, NWH, NWW, Hs, Ws, WH, WW, True, BW)
        c = tl.arange(0, D)
        q = _load_head(qkv, bias, bs, sy, sx, inwin, valid, 0, n, Hs, Ws, NH, D, HAS_BIAS)
        kk = tl.arange(0, BH)
        rel = _rel_terms(q, rh, y, WH, D, BH, inv)  # (BW, BH)
        row = ((bw * (WH * WW) + t) * NH + n).to(tl.int64)
        m = inwin[:, None]
        dst = qa + row[:, None] * DQ
        tl.store(dst + c[None, :], q, mask=m)
        tl.store(dst + D + kk[None, :], rel.to(qa.dtype.element_ty), mask=m & (kk < WH)[None, :])
        e = tl.arange(0, EQ)
        zq = tl.zeros((BW, EQ), dtype=qa.dtype.element_ty)
        tl.store(dst + D + e[None, :], zq, mask=m & ((e >= WH + WW) & (D + e < DQ))[None, :])
        k = _load_head(qkv, bias, bs, sy, sx, inwin, valid, 1, n, Hs, Ws, NH, D, HAS_BIAS)
        dst = ka + row[:, None] * DQ
        tl.store(dst + c[None, :], k, mask=m)
        ty = t // WW
        tx = t % WW
        one = (e[None, :] == ty[:, None]) | (e[None, :] == WH + tx[:, None])
        tl.store(
            dst + D + e[None, :],
            tl.where(one, 1.0, 0.0).to(ka.dtype.element_ty),
            mask=m & (D + e < DQ)[None, :],
        )
        v = _load_head(qkv, bias, bs, sy, sx, inwin, valid, 2, n, Hs, Ws, NH, D, HAS_BIAS)
        dst = va + row[:, None] * DV
        tl.store(dst + c[None, :], v, mask=m)
        if DV > D:
            ev = tl.arange(0, EV)
            tl.store(
                dst + D + ev[None, :],
                tl.zeros((BW, EV), dtype=va.dtype.element_ty),
                mask=m & (D + ev < DV)[None, :],
            )

    @triton.jit
    def _widen_cols(  # type: ignore[no-untyped-def]
        qkv,
        bias,
        rw,
        qa,
        Hs,
        Ws,
        NWH,
        NWW,
        inv,
        NH: tl.constexpr,
        D: tl.constexpr,
        WH: tl.constexpr,
        WW: tl.constexpr,
        BW: tl.constexpr,
        BH: tl.constexpr,
        DQ: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        """Program (window, column, head): ``q·Rw[column]·inv`` into q'."""
        bw = tl.program_id(0)
        x = tl.program_id(1)
        n = tl.program_id(2)
        bs, sy, sx, inwin, valid, t = _window_tokens(bw, x, NWH, NWW, Hs, Ws, WH, WW, False, BH)
        q = _load_head(qkv, bias, bs, sy, sx, inwin, valid, 0, n, Hs, Ws, NH, D, HAS_BIAS)
        kk = tl.arange(0, BW)
        rel = _rel_terms(q, rw, x, WW, D, BW, inv)  # (BH, BW)
        row = ((bw * (WH * WW) + t) * NH + n).to(tl.int64)
        tl.store(
            qa + row[:, None] * DQ + D + WH + kk[None, :],
            rel.to(qa.dtype.element_ty),
            mask=inwin[:, None] & (kk < WW)[None, :],
        )

    @triton.jit
    def _unwiden(  # type: ignore[no-untyped-def]
        o,
        out,
        Hs,
        Ws,
        NWH,
        NWW,
        NH: tl.constexpr,
        D: tl.constexpr,
        WH: tl.constexpr,
        WW: tl.constexpr,
        BW: tl.constexpr,
        DV: tl.constexpr,
    ):
        """Program (window, row, head): the attention output's first D values of each token in
        the image back to its raster position (pad tokens dropped)."""
        bw = tl.program_id(0)
        y = tl.program_id(1)
        n = tl.program_id(2)
        bs, sy, sx, _, valid, t = _window_tokens(bw, y, NWH, NWW, Hs, Ws, WH, WW, True, BW)
        c = tl.arange(0, D)
        row = ((bw * (WH * WW) + t) * NH + n).to(tl.int64)
        val = tl.load(o + row[:, None] * DV + c[None, :], mask=valid[:, None], other=0.0)
        tok = ((bs * Hs + sy) * Ws + sx).to(tl.int64)
        tl.store(out + tok[:, None] * (NH * D) + n * D + c[None, :], val, mask=valid[:, None])


def usable(x: torch.Tensor) -> bool:
    m = mode()
    if m == "0" or not HAVE_TRITON:
        return False
    if m == "auto":
        return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    return True


def _geometry(block: Any, x: torch.Tensor) -> tuple[int, int, tuple[int, int]] | None:
    """(heads, head dim, window) when this block and input take the fused path, else None."""
    attn = getattr(block, "attn", None)
    if attn is None or not getattr(attn, "use_rel_pos", False) or x.dim() != 4:
        return None
    nh = attn.num_heads
    d = attn.qkv.out_features // 3 // nh
    win = block.window_size
    wh, ww = (win, win) if win > 0 else (x.shape[1], x.shape[2])
    ok = (
        usable(x)
        and d >= 16
        and d & (d - 1) == 0
        and max(wh, ww) <= MAX_GRID
        and d + wh + ww + 8 <= sa.MAX_HEAD_DIM
        and attn.qkv.out_features == 3 * nh * d == 3 * x.shape[-1]
    )
    return (nh, d, (wh, ww)) if ok else None


def fusable(block: Any, x: torch.Tensor) -> bool:
    """Whether this block and input take the fused path (else upstream's forward)."""
    return _geometry(block, x) is not None


def widen(
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    rh: torch.Tensor,
    rw: torch.Tensor,
    nh: int,
    window: tuple[int, int],
    scale: float,
    kernel_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q', k', v' (windows × tokens × heads × dim) from the unpartitioned projection ``qkv``
    (B, H, W, 3·heads·d) for windows of ``window`` (the image's own size: global attention)."""
    b, hs, ws, c3 = qkv.shape
    d = c3 // 3 // nh
    wh, ww = window
    nwh, nww = -(-hs // wh), -(-ws // ww)
    dq, dv = sa.head_dims(d, wh + ww, kernel_name)
    nb = b * nwh * nww
    qkv = qkv.contiguous()
    qa = qkv.new_empty(nb, wh * ww, nh, dq)
    ka = qkv.new_empty(nb, wh * ww, nh, dq)
    va = qkv.new_empty(nb, wh * ww, nh, dv)
    has_bias = bias is not None
    bias_arg = bias if bias is not None else qkv  # unused when HAS_BIAS is false
    bw_, bh_ = _next_pow2(max(ww, 16)), _next_pow2(max(wh, 16))
    inv = 1.0 / scale
    common = dict(NH=nh, D=d, WH=wh, WW=ww, BW=bw_, BH=bh_, DQ=dq, HAS_BIAS=has_bias)
    _widen_rows[(nb, wh, nh)](
        qkv,
        bias_arg,
        rh.contiguous(),
        qa,
        ka,
        va,
        hs,
        ws,
        nwh,
        nww,
        inv,
        DV=dv,
        EQ=_next_pow2(dq - d),
        EV=_next_pow2(max(dv - d, 1)),
        num_warps=_warps(),
        **common,
    )
    _widen_cols[(nb, ww, nh)](
        qkv, bias_arg, rw.contiguous(), qa, hs, ws, nwh, nww, inv, num_warps=_warps(), **common
    )
    return qa, ka, va


def unwiden(
    o: torch.Tensor, shape: tuple[int, int, int], nh: int, d: int, window: tuple[int, int]
) -> torch.Tensor:
    """The attention output (windows × tokens × heads × dv) back to (B, H, W, heads·d)."""
    b, hs, ws = shape
    wh, ww = window
    nwh, nww = -(-hs // wh), -(-ws // ww)
    o = o.contiguous()
    out = o.new_empty(b, hs, ws, nh * d)
    _unwiden[(o.shape[0], wh, nh)](
        o,
        out,
        hs,
        ws,
        nwh,
        nww,
        NH=nh,
        D=d,
        WH=wh,
        WW=ww,
        BW=_next_pow2(max(ww, 16)),
        DV=o.shape[-1],
        num_warps=_warps(),
    )
    return out


def fused_block_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Drop-in ``Block.forward`` of SAM's ViT (module docstring); upstream's forward where the
    fused path does not apply."""
    geometry = _geometry(self, x)
    if geometry is None:
        return self._runner_upstream_forward(x)  # type: ignore[no-any-return]
    nh, d, window = geometry
    attn = self.attn
    b, hs, ws, _ = x.shape
    kname = sa.kernel_for(x)
    qkv = attn.qkv(self.norm1(x))
    rh, rw = sa.rel_pos_tables(attn, window[0], window[1])
    qa, ka, va = widen(qkv, attn.qkv.bias, rh, rw, nh, window, attn.scale, kname)
    o = sa.attend(qa, ka, va, attn.scale, kname)
    x = x + attn.proj(unwiden(o, (b, hs, ws), nh, d, window))
    return x + self.mlp(self.norm2(x))  # type: ignore[no-any-return]


def patch_sam_blocks(module: torch.nn.Module) -> int:
    """Give every SAM ``Block`` (one whose ``attn`` is a ``RelPosAttention`` with relative
    positions) under ``module`` the fused forward (instance attribute; class untouched). Returns
    how many were patched; none when ``RUNNER_SAM_FUSED=0``, Triton is missing, or
    ``sam_attention`` is off (``RUNNER_FAST_SAM_ATTENTION=0``: upstream's path throughout)."""
    if mode() == "0" or not HAVE_TRITON or not sa.enabled():
        return 0
    n = 0
    for m in module.modules():
        attn = getattr(m, "attn", None)
        if (
            type(m).__name__ == "Block"
            and type(attn).__name__ == "RelPosAttention"
            and getattr(attn, "use_rel_pos", False)
            and "_runner_upstream_forward" not in m.__dict__
        ):
            m.__dict__["_runner_upstream_forward"] = m.forward
            m.__dict__["forward"] = types.MethodType(fused_block_forward, m)
            n += 1
    return n
