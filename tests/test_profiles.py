"""--profile auto|default|low-vram (runner/profiles.py): what each GPU size gets, and that explicit
flags always win."""

from __future__ import annotations

import dataclasses

from runner.config import EngineConfig
from runner.profiles import apply_profile


def test_auto_without_gpu_info_changes_nothing() -> None:
    cfg = EngineConfig()
    out, reasons = apply_profile(cfg, None)
    assert out == cfg and "unknown" in reasons[0]


def test_auto_on_a_big_gpu_keeps_the_defaults() -> None:
    cfg = EngineConfig()
    assert apply_profile(cfg, 71.0)[0] == cfg


def test_auto_on_a_mid_gpu_trims_the_batch_only() -> None:
    out, _ = apply_profile(EngineConfig(), 20.0)
    assert out == dataclasses.replace(EngineConfig(), max_num_seqs=64)


def test_auto_at_8_and_6_gib_picks_low_vram_without_offload() -> None:
    for gib in (8.0, 5.997):  # 6 GiB of an H200 as --gpu-memory-utilization rounds it
        out, reasons = apply_profile(EngineConfig(), gib)
        assert out.enable_fp8_weights and out.kv_cache_dtype == "fp8"
        assert (out.max_num_seqs, out.max_model_len, out.max_num_batched_tokens) == (8, 4096, 2048)
        assert out.resolution == "base" and out.cpu_offload_gb == 0.0
        assert any("low-vram" in r for r in reasons)


def test_low_vram_offloads_only_below_what_fp8_weights_need() -> None:
    out, reasons = apply_profile(EngineConfig(), 4.0)
    assert out.cpu_offload_gb == 1.5
    assert any("offload" in r for r in reasons)


def test_explicit_flags_win_over_the_profile() -> None:
    cfg = EngineConfig(profile="low-vram", max_num_seqs=16, resolution="gundam", quantization="awq")
    out, _ = apply_profile(cfg, None)
    assert (out.max_num_seqs, out.resolution, out.quantization) == (16, "gundam", "awq")
    assert not out.enable_fp8_weights  # an explicit quantization method is kept as is


def test_default_profile_changes_nothing() -> None:
    cfg = EngineConfig(profile="default")
    assert apply_profile(cfg, 4.0)[0] == cfg
