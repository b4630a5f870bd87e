"""--profile auto|default|low-vram (runner/profiles.py): what each GPU size gets, and that explicit
flags always win."""

from __future__ import annotations

import dataclasses

import pytest

from runner.config import EngineConfig
from runner.profiles import BudgetError, apply_profile


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
    assert out.cpu_offload_gb == 0.8  # 4.3 GiB predicted need - 4.0 + 0.5 margin
    assert any("offload" in r for r in reasons)
    assert apply_profile(EngineConfig(), 4.3)[0].cpu_offload_gb == 0.0


def test_tight_budget_halves_the_step_budget_unless_the_user_set_it() -> None:
    out, reasons = apply_profile(EngineConfig(), 4.3)  # a 6 GiB run: 6 - 1.7 for vLLM
    assert out.max_num_batched_tokens == 1024 and any("1024" in r for r in reasons)
    mine = apply_profile(EngineConfig(max_num_batched_tokens=4096), 4.3)[0]
    assert mine.max_num_batched_tokens == 4096


def test_run_budget_leaves_room_for_what_vllm_does_not_count() -> None:
    from runner.profiles import OUTSIDE_VLLM_GIB, BudgetError, vllm_utilization_for

    util, why = vllm_utilization_for(6.0, 79.18)
    assert util == round((6.0 - OUTSIDE_VLLM_GIB) / 79.18, 4) and "vLLM gets 4.30 GiB" in why
    util8, _ = vllm_utilization_for(8.0, 8.0)  # a whole 8 GiB card
    assert util8 == round(6.3 / 8.0, 4)
    for bad in ((9.0, 8.0), (3.0, 8.0)):
        with pytest.raises(BudgetError):
            vllm_utilization_for(*bad)


def test_explicit_flags_win_over_the_profile() -> None:
    cfg = EngineConfig(profile="low-vram", max_num_seqs=16, resolution="gundam", quantization="awq")
    out, _ = apply_profile(cfg, None)
    assert (out.max_num_seqs, out.resolution, out.quantization) == (16, "gundam", "awq")
    assert not out.enable_fp8_weights  # an explicit quantization method is kept as is


def test_default_profile_changes_nothing() -> None:
    cfg = EngineConfig(profile="default")
    assert apply_profile(cfg, 4.0)[0] == cfg


def test_engines_sharing_a_gpu_get_what_fits_with_their_measured_excess() -> None:
    from runner.profiles import DEVICE_RESERVED_GIB, ENGINE_EXCESS_GIB, shared_gpu_utilization

    h100 = 79.18
    u2, why = shared_gpu_utilization(h100, 2)
    assert 2 * (u2 * h100 + ENGINE_EXCESS_GIB) <= h100 - DEVICE_RESERVED_GIB
    assert u2 > 0.42 and "2 engines" in why
    assert shared_gpu_utilization(h100, 1)[0] == 0.9  # one engine: the default, as measured
    assert shared_gpu_utilization(139.8, 2)[0] == 0.45  # H200: room for the default halves
    with pytest.raises(BudgetError, match="do not fit"):
        shared_gpu_utilization(23.6, 2)


GIB = 2**30


def test_inflight_window_queues_a_second_batch_when_the_host_has_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runner import profiles
    from runner.profiles import inflight_window, page_host_bytes

    per_page = page_host_bytes(144.0)  # A4 at 144 dpi + Gundam views (uint8) twice: ~26 MiB
    assert 25 * 2**20 < per_page < 27 * 2**20
    # GPU session 9's host: ~120 GiB available, two workers: a whole second batch each
    window, why = inflight_window(384, 144.0, workers_on_host=2, mem_available=120 * GIB)
    assert window == 2 * 384 and "2 workers" in why
    # a small host: as many as 30% of its memory holds, never less than the old quarter batch
    window, _ = inflight_window(512, 144.0, mem_available=32 * GIB)
    assert window == 512 + int(0.3 * 32 * GIB / per_page) < 1024
    window, _ = inflight_window(512, 144.0, mem_available=4 * GIB)
    assert window == 512 + 128
    monkeypatch.setattr(profiles, "mem_available_bytes", lambda: None)  # not Linux
    window, why = inflight_window(64, 144.0)
    assert window == 64 + 16 and "unknown" in why


def test_inflight_window_is_the_cli_default_for_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner import cli, profiles

    seen = {}

    def fake(max_num_seqs: int, dpi: float, workers_on_host: int = 1) -> tuple[int, str]:
        seen.update(seqs=max_num_seqs, dpi=dpi, workers=workers_on_host)
        return 777, "test"

    monkeypatch.setattr(profiles, "inflight_window", fake)
    monkeypatch.setenv("RUNNER_WORKERS_ON_HOST", "4")

    def config(*extra: str) -> object:
        base = ["--input-dir", ".", "--output-dir", "o", "--engine", "vllm", "--profile", "default"]
        return cli.config_from_args(cli.build_parser().parse_args([*base, *extra]), ("a.pdf",), ".")

    cfg = config("--max-num-seqs", "100")
    assert cfg.batch_pages == 777 and seen == {"seqs": 100, "dpi": 144.0, "workers": 4}
    assert config("--batch-pages", "9").batch_pages == 9
