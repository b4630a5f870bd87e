"""SAM's relative-position attention with the bias folded into q/k (runner/vllm_plugin/sam_attention.py)
against a copy of upstream's ``RelPosAttention.forward`` (vLLM 0.26 deepencoder.py) on CPU, and
against upstream's own module where vLLM imports (the GPU machine)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn
from upstream_sam import RelPosAttention

from runner.vllm_plugin import sam_attention as sa
from tools.bench_sam import random_init


@pytest.mark.parametrize(
    "size,rel_size,batch",
    [
        ((16, 16), (16, 16), 2),  # a global layer (rel-pos table of the grid's own size)
        ((7, 7), (7, 7), 5),  # windows: 7 + 7 extra dims, padded to a multiple of 8
        ((10, 10), (16, 16), 1),  # a smaller view than the table (upstream interpolates the table)
        ((6, 9), (6, 9), 3),  # non-square grid
    ],
)
def test_fast_forward_equals_upstream_forward(
    size: tuple[int, int], rel_size: tuple[int, int], batch: int
) -> None:
    torch.manual_seed(0)
    m = RelPosAttention(96, 6, rel_size).double()  # head_dim 16
    x = torch.randn(batch, *size, 96, dtype=torch.float64)
    with torch.no_grad():  # inference, as in the engine
        want = m(x)
        assert sa.patch_sam_attention(m) == 1
        got = m(x)
    assert m.forward.__func__ is sa.fast_forward
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bf16_close_to_upstream() -> None:
    """In bf16 the two differ by rounding only (upstream rounds the bias to bf16 first)."""
    torch.manual_seed(1)
    m = RelPosAttention(128, 2, (8, 8))  # head_dim 64: 1/scale = 8, exact in bf16
    x = torch.randn(2, 8, 8, 128)
    ref = m.double()(x.double())
    m = m.to(torch.bfloat16)
    up = m(x.bfloat16()).double()
    sa.patch_sam_attention(m)
    fast = m(x.bfloat16()).double()
    err_up = (up - ref).abs().max().item()
    err_fast = (fast - ref).abs().max().item()
    assert err_fast <= 2 * err_up + 1e-3, (err_fast, err_up)


def test_patch_is_idempotent_can_be_turned_off_and_skips_wide_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    m = nn.Sequential(RelPosAttention(32, 2, (4, 4)), RelPosAttention(32, 2, (4, 4)))
    monkeypatch.setenv("RUNNER_FAST_SAM_ATTENTION", "0")
    assert sa.patch_sam_attention(m) == 0
    monkeypatch.delenv("RUNNER_FAST_SAM_ATTENTION")
    assert sa.patch_sam_attention(m) == 2
    assert sa.patch_sam_attention(m) == 0  # already patched
    # a grid whose widened head would exceed a flash kernel's limit takes upstream's path
    monkeypatch.setattr(sa, "MAX_HEAD_DIM", 24)  # head 16 + 4 + 4 + 8 > 24
    wide = RelPosAttention(32, 2, (4, 4)).double()
    x = torch.randn(1, 4, 4, 32, dtype=torch.float64)
    sa.patch_sam_attention(wide)
    calls = []
    up = wide._upstream_forward
    wide._upstream_forward = lambda t: calls.append(1) or up(t)
    wide(x)
    assert calls == [1]


def test_head_dims_per_kernel() -> None:
    """Widened heads padded to what each kernel runs: a multiple of 8 for SDPA; FA3's compiled
    sizes, with 128-wide values beside 192-wide keys (its MLA kernel)."""
    assert sa.head_dims(64, 28, "sdpa") == (96, 96)  # 14x14 windows
    assert sa.head_dims(64, 128, "sdpa") == (192, 192)  # 64x64 global grid
    assert sa.head_dims(64, 80, "sdpa") == (144, 144)  # 40x40 (640² crops)
    assert sa.head_dims(64, 28, "fa3") == (96, 96)
    assert sa.head_dims(64, 128, "fa3") == (192, 128)
    assert sa.head_dims(64, 80, "fa3") == (192, 128)
    assert sa.head_dims(64, 160, "fa3") == (256, 256)  # 80x80 (1280² Large views)
    assert sa.head_dims(64, 40, "fa3") == (128, 128)


@pytest.mark.parametrize("dims", [(96, 96), (192, 128), (200, 72)])
def test_padding_to_kernel_sizes_keeps_the_result(
    monkeypatch: pytest.MonkeyPatch, dims: tuple[int, int]
) -> None:
    """Zero columns added to q'/k' and to v (to reach a kernel's head size) change nothing: the
    FA3 shapes (narrower values than keys) run through SDPA here, which takes them on CPU."""
    torch.manual_seed(2)
    m = RelPosAttention(128, 2, (8, 8)).double()  # head 64 + 16 bias columns
    x = torch.randn(2, 8, 8, 128, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
        sa.patch_sam_attention(m)
        monkeypatch.setattr(sa, "head_dims", lambda d, extra, kernel_name: dims)
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (GPU machine)")
@pytest.mark.parametrize("kernel_name", ["auto", "sdpa", "fa3", "cudnn"])
def test_fast_forward_equals_vllm_relposattention(monkeypatch: pytest.MonkeyPatch, kernel_name: str) -> None:
    """Against upstream's own module: equal in float64; in bf16 (on CUDA where there is one) at
    least as close to the float64 result as upstream's bf16 path is (upstream rounds the bias to
    bf16 before adding it; here it is summed in the kernel's fp32 accumulator)."""
    import copy

    from vllm.model_executor.models.deepencoder import RelPosAttention as Upstream

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if kernel_name != "auto":
        if dev == "cpu" or (kernel_name == "fa3" and not sa._fa3_available()):
            pytest.skip(f"{kernel_name} needs a CUDA GPU (fa3: a Hopper one)")
        monkeypatch.setenv("RUNNER_SAM_KERNEL", kernel_name)
    torch.manual_seed(0)
    for size, batch in (((64, 64), 1), ((14, 14), 8), ((40, 40), 2)):
        m = Upstream(768, num_heads=12, use_rel_pos=True, input_size=size)
        with torch.no_grad():
            m.rel_pos_h.normal_(0, 0.5)
            m.rel_pos_w.normal_(0, 0.5)
            x = torch.randn(batch, *size, 768)
            ref = copy.deepcopy(m).double()(x.double())
            m64 = copy.deepcopy(m).double()
            assert sa.patch_sam_attention(m64) == 1
            torch.testing.assert_close(m64(x.double()), ref, rtol=1e-9, atol=1e-9)
            mb = copy.deepcopy(m).to(dev, torch.bfloat16)
            xb = x.to(dev, torch.bfloat16)
            up = mb(xb).double().cpu()
            assert sa.patch_sam_attention(mb) == 1
            fast = mb(xb).double().cpu()
        err_up = ((up - ref).norm() / ref.norm()).item()
        err_fast = ((fast - ref).norm() / ref.norm()).item()
        assert err_fast <= 1.2 * err_up + 1e-3, (size, err_fast, err_up)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (GPU machine)")
def test_whole_sam_encoder_equals_upstream_in_float64() -> None:
    """vLLM's SAM ViT-B (windowed and global layers, interpolated rel-pos tables and position
    embedding at a 256² input), upstream's forward vs the patched one."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.deepencoder import build_sam_vit_b

    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        sam = random_init(build_sam_vit_b().double().eval())
        with torch.no_grad():
            x = torch.randn(2, 3, 256, 256, dtype=torch.float64)
            want = sam(x)
            assert sa.patch_sam_attention(sam) == 12
            got = sam(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_rel_pos_tables_are_cached_per_grid_and_follow_weight_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(3)
    m = RelPosAttention(96, 6, (16, 16)).double()
    random_init(m)
    calls: list[tuple[int, int]] = []
    real = sa.get_rel_pos

    def counting(q: int, k: int, rel: torch.Tensor) -> torch.Tensor:
        calls.append((q, k))
        return real(q, k, rel)

    monkeypatch.setattr(sa, "get_rel_pos", counting)
    with torch.no_grad():
        a = sa.rel_pos_tables(m, 16, 16)
        b = sa.rel_pos_tables(m, 10, 10)  # a global block also sees the crops' smaller grid
        assert sa.rel_pos_tables(m, 16, 16) is a and sa.rel_pos_tables(m, 10, 10) is b
        assert calls == [(16, 16), (16, 16), (10, 10), (10, 10)]  # computed once per grid
        torch.testing.assert_close(a[0], real(16, 16, m.rel_pos_h), rtol=0, atol=0)
        torch.testing.assert_close(b[1], real(10, 10, m.rel_pos_w), rtol=0, atol=0)
        m.rel_pos_h.mul_(2)  # an in-place weight update (a reload) is seen
        c = sa.rel_pos_tables(m, 16, 16)
        torch.testing.assert_close(c[0], real(16, 16, m.rel_pos_h), rtol=0, atol=0)
        assert not torch.equal(c[0], a[0])
    # with autograd live the tables are built each time (the cache holds no graph)
    n = len(calls)
    sa.rel_pos_tables(m, 16, 16)
    assert len(calls) == n + 2
