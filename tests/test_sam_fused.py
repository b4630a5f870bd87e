"""SAM blocks with the Triton-built widened heads (runner/vllm_plugin/sam_fused.py) against a copy
of upstream's ``Block`` (vLLM 0.26 deepencoder.py) and against the PyTorch path of
``sam_attention``.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels
are defined, so the cases run in a child process: ``python tests/test_sam_fused.py``); float64 and
float32 (the interpreter's dot is wrong for bf16). On the GPU machine the same cases run on CUDA in
bf16 against vLLM's own modules (the tests marked for vLLM)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from upstream_sam import RelPosAttention  # noqa: E402

from runner.vllm_plugin import sam_attention as sa  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Upstream's ``window_partition``."""
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c), (hp, wp)


def _window_unpartition(
    win: torch.Tensor, ws: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Upstream's ``window_unpartition``."""
    hp, wp = pad_hw
    h, w = hw
    b = win.shape[0] // (hp * wp // ws // ws)
    x = win.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if hp > h or wp > w else x


class Block(nn.Module):
    """Copy of upstream's ``Block`` (same submodule names: the patch looks for them)."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, input_size: tuple[int, int], qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = RelPosAttention(dim, num_heads, size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.window_size = window_size
        with torch.no_grad():  # LayerNorm affine parameters away from (1, 0): they must matter
            for norm in (self.norm1, self.norm2):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)
            if qkv_bias:
                self.attn.qkv.bias.normal_(0.0, 0.5)  # the pad tokens' q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = _window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = _window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


# (grid, window, table size, batch, qkv bias): global, global with an interpolated table, a
# non-square global grid, windows that pad the grid, windows that tile it, pad tokens without bias
CASES = [
    ((16, 16), 0, (16, 16), 2, True),
    ((10, 10), 0, (16, 16), 1, True),
    ((6, 9), 0, (6, 9), 3, True),
    ((16, 16), 7, (16, 16), 2, True),
    ((14, 14), 7, (14, 14), 1, True),
    ((9, 12), 5, (9, 12), 2, False),
]


def run_cases(dtype: torch.dtype, device: str) -> list[dict[str, object]]:
    """Each case: upstream's block, the PyTorch path (``sam_attention``) and the fused path on the
    same weights and input; max abs differences against upstream's result."""
    from runner.vllm_plugin import sam_fused as sf

    out = []
    for grid, window, table, batch, bias in CASES:
        torch.manual_seed(hash((grid, window, batch)) % 1000)
        ref_block = Block(32, 2, window, table, bias).to(torch.float64)
        x = torch.randn(batch, *grid, 32, dtype=torch.float64)
        with torch.no_grad():
            want = ref_block(x)
            torch_path = copy.deepcopy(ref_block)
            sa.patch_sam_attention(torch_path)
            got_torch = torch_path(x)
            fused = copy.deepcopy(ref_block).to(device, dtype)
            n = sf.patch_sam_blocks(fused)
            assert n == 1, n
            assert sf.fusable(fused, x.to(device, dtype)), "the fused path must be taken"
            got = fused(x.to(device, dtype)).double().cpu()
        out.append(
            {
                "case": [list(grid), window, list(table), batch, bias],
                "fused_vs_upstream": (got - want).abs().max().item(),
                "torch_vs_upstream": (got_torch - want).abs().max().item(),
                "scale": want.abs().max().item(),
            }
        )
    return out


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton (pip install triton; CPU: its interpreter)")
def test_fused_blocks_equal_upstream_under_triton_interpreter() -> None:
    """float64 and float32 on the CPU: the fused block equals upstream's block (and so the
    PyTorch path) to rounding."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "RUNNER_SAM_FUSED": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(Path(__file__)), "cases"], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results["float64"]) == len(CASES) and len(results["float32"]) == len(CASES)
    for row in results["float64"]:
        assert row["fused_vs_upstream"] < 1e-10 * max(1.0, row["scale"]), row
        assert row["torch_vs_upstream"] < 1e-10 * max(1.0, row["scale"]), row
    for row in results["float32"]:
        assert row["fused_vs_upstream"] < 2e-4 * max(1.0, row["scale"]), row


def test_not_patched_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RUNNER_SAM_FUSED=0`` or ``RUNNER_FAST_SAM_ATTENTION=0``: nothing is patched; a block
    that is not SAM's (no relative positions) never is."""
    from runner.vllm_plugin import sam_fused as sf

    blk = Block(32, 2, 0, (8, 8))
    monkeypatch.setenv("RUNNER_SAM_FUSED", "0")
    assert sf.patch_sam_blocks(blk) == 0
    monkeypatch.setenv("RUNNER_SAM_FUSED", "auto")
    monkeypatch.setenv("RUNNER_FAST_SAM_ATTENTION", "0")
    assert sf.patch_sam_blocks(blk) == 0
    monkeypatch.delenv("RUNNER_FAST_SAM_ATTENTION")
    blk.attn.use_rel_pos = False
    assert sf.patch_sam_blocks(blk) == 0


def test_grids_beyond_the_gpu_tested_sizes_keep_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large mode's 80×80 global grid is not fused (only 64×64, 40×40 and 14×14 windows were run
    on a GPU); its 14×14 windowed blocks are."""
    from runner.vllm_plugin import sam_fused as sf

    if not sf.HAVE_TRITON:
        pytest.skip("Triton missing")
    monkeypatch.setenv("RUNNER_SAM_FUSED", "1")
    x64, x80 = torch.zeros(1, 64, 64, 32), torch.zeros(1, 80, 80, 32)
    glob, win = Block(32, 2, 0, (64, 64)), Block(32, 2, 14, (64, 64))
    assert sf.fusable(glob, x64) and not sf.fusable(glob, x80)
    assert sf.fusable(win, x64) and sf.fusable(win, x80)


def test_auto_mode_keeps_cpu_tensors_on_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` fuses CUDA half/bf16 only: a patched block given CPU float tensors runs
    upstream's forward (here: exactly the reference)."""
    from runner.vllm_plugin import sam_fused as sf

    if not sf.HAVE_TRITON:
        pytest.skip("Triton missing: nothing is patched")
    monkeypatch.setenv("RUNNER_SAM_FUSED", "auto")
    torch.manual_seed(0)
    blk = Block(32, 2, 7, (16, 16)).double()
    x = torch.randn(1, 16, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        want = blk(x)
        assert sf.patch_sam_blocks(blk) == 1
        assert not sf.fusable(blk, x)
        assert torch.equal(blk(x), want)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="needs vLLM and a CUDA GPU (GPU machine)",
)
def test_fused_sam_encoder_matches_upstream_in_bf16_on_gpu() -> None:
    """vLLM's SAM ViT-B (12 blocks: windowed and global) at Gundam's two view sizes in bf16:
    the fused encoder is at least as close to upstream's float64 result as upstream's own bf16
    forward (and as the PyTorch path)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.deepencoder import build_sam_vit_b

    from runner.vllm_plugin import sam_fused as sf
    from tools.bench_sam import random_init

    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig()):
        ref = random_init(build_sam_vit_b().double().eval()).cuda()
        for size, batch in ((1024, 1), (640, 2)):
            x = torch.randn(batch, 3, size, size, dtype=torch.float64, device="cuda")
            with torch.no_grad():
                want = ref(x)
                up = copy.deepcopy(ref).to(torch.bfloat16)
                got_up = up(x.to(torch.bfloat16)).double()
                torch_path = copy.deepcopy(up)
                assert sa.patch_sam_attention(torch_path) == 12
                got_torch = torch_path(x.to(torch.bfloat16)).double()
                fused = copy.deepcopy(up)
                assert sa.patch_sam_attention(fused) == 12
                assert sf.patch_sam_blocks(fused) == 12
                got = fused(x.to(torch.bfloat16)).double()

            def err(a: torch.Tensor, want: torch.Tensor = want) -> float:
                return ((a - want).norm() / want.norm()).item()

            assert err(got) <= 1.2 * err(got_up) + 1e-3, (size, err(got), err(got_up), err(got_torch))
            assert err(got) <= 1.2 * err(got_torch) + 1e-3, (size, err(got), err(got_torch))


if __name__ == "__main__" and sys.argv[1:] == ["cases"]:
    res = {"float64": run_cases(torch.float64, "cpu"), "float32": run_cases(torch.float32, "cpu")}
    print(json.dumps(res))
