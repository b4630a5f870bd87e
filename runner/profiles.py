"""Engine profiles (configuration stage): ``--profile auto|default|low-vram`` -> ``EngineConfig``.

In: the ``EngineConfig`` the CLI built and the GPU memory the process may use (GiB; ``None`` when
unknown). Out: the adjusted config plus one human-readable reason per change, which the CLI logs.
Only values the user left at their defaults are changed; explicit flags always win.

Why these settings (issue 11; vLLM 0.26, DeepSeek-OCR / OCR-2, ~2.9B parameters, ~6.3 GiB bf16):
- bf16 weights alone do not fit a 6 GiB card: fp8 weights (``quantization="fp8"``) halve them.
  vLLM runs fp8 weights natively on Ada/Hopper and through its FP8 Marlin (weight-only) kernels
  on Ampere cards such as the RTX 3060.
- fp8 KV cache halves the 60 KiB/token of bf16 KV; few sequences and a 4096-token context keep
  the KV reservation near 1 GiB.
- ``base`` resolution sends ~273 vision tokens instead of Gundam's ~903 for an A4 page and keeps
  the vision encoder's peak activations (profiled by vLLM at start-up) small.
- CPU offload is the last resort under 6 GiB: it works but every step copies weights over PCIe.
Measured with an 8 GiB vLLM budget (tmp_pdf_runs/GPU_NOTES.md); the 6 GiB run is still to be
repeated after the offload threshold fix.
"""

from __future__ import annotations

import dataclasses
import math

from runner.config import EngineConfig

_DEFAULTS = EngineConfig()
LOW_VRAM_GIB = 12.0  # at or below this, ``auto`` picks the low-VRAM profile
# Measured (vLLM 0.26, OCR-1, this profile; NOTES.md): fp8 weights 3.56 GiB, non-torch ~0.24 GiB,
# CUDA graphs 0.07 GiB, activation peak 0.5 GiB (H200, 2k-token steps) to 0.95 GiB (H100, GPU
# session 4), most of it SAM's materialised attention bias (~0.4 GB per image and global layer),
# which runner/vllm_plugin/sam_attention.py no longer builds. Predicted need with that and
# 1k-token steps: ~4.2 GiB + KV for one 4k-token sequence (0.12 GiB fp8) -> offload below 4.3 GiB.
# (Not yet measured; vLLM 0.26's offload also fails with --load-format dummy.)
OFFLOAD_BELOW_GIB = 4.3
MID_VRAM_GIB = 30.0  # at or below this, ``auto`` trims the batch
# GPU memory a run uses beyond vLLM's budget (gpu_memory_utilization x card): measured on the H100
# (GPU session 4, low-VRAM profile, NVML device peak minus vLLM's budget) 1.67 GiB at a 6 GiB and
# at an 8 GiB budget alike: the engine core's CUDA context (~0.52 GiB, in use before vLLM measures)
# plus ~1.15 GiB vLLM does not count. A run told it may use N GiB gives vLLM N minus this.
# GPU session 5 (bias-free SAM attention): engine-core process peaks 6.24 GiB at N=6 (vLLM 4.30)
# and 7.16 GiB at N=8 (vLLM 6.30): 8 GiB fits, 6 GiB is 0.24 GiB over; the excess over vLLM's
# count was 1.94 vs 0.86 GiB, so it is not a constant. --gpu-memory-gib therefore also caps the
# engine core's PyTorch allocator (runner/vllm_plugin/memory_cap.py); GPU session 6: process peaks
# 5.84 / 7.12 GiB at N = 6 / 8 with the cap.
OUTSIDE_VLLM_GIB = 1.7
#: what the engine core holds outside PyTorch's allocator (GPU sessions 4-5, H100): its CUDA
#: context (0.52 GiB) and vLLM's "non-torch memory" (0.24 GiB), rounded up. The allocator cap
#: of a run told it may use N GiB is N minus this.
OUTSIDE_ALLOCATOR_GIB = 0.8
# A low-VRAM budget below this also halves the step's token budget (one page image profiled
# instead of two: a smaller activation reservation, more room for KV).
TIGHT_BUDGET_GIB = 5.0


class BudgetError(ValueError):
    """--gpu-memory-gib cannot be honoured on this GPU."""


def vllm_utilization_for(run_gib: float, card_gib: float) -> tuple[float, str]:
    """``--gpu-memory-gib``: the whole run may use ``run_gib`` of a ``card_gib`` card. Returns
    vLLM's ``gpu_memory_utilization`` (its own budget = run_gib - OUTSIDE_VLLM_GIB) and the reason."""
    if run_gib > card_gib + 1e-6:
        raise BudgetError(f"--gpu-memory-gib {run_gib:g} is more than this GPU has ({card_gib:.1f} GiB)")
    budget = run_gib - OUTSIDE_VLLM_GIB
    if budget < 2.0:
        raise BudgetError(
            f"--gpu-memory-gib {run_gib:g} leaves vLLM {budget:.1f} GiB after the ~{OUTSIDE_VLLM_GIB:g} GiB "
            "a run uses outside its budget (CUDA context and more); at least 2 GiB are needed "
            "(with --cpu-offload-gb)"
        )
    util = round(budget / card_gib, 4)
    return util, (
        f"gpu_memory_utilization={util}: the run may use {run_gib:g} GiB of {card_gib:.1f}; vLLM gets "
        f"{budget:.2f} GiB, {OUTSIDE_VLLM_GIB:g} GiB stay for what it does not count (measured)"
    )


def allocator_cap_for(run_gib: float) -> tuple[float, str]:
    """``--gpu-memory-gib``: the engine core's PyTorch allocator cap (GiB) and the reason."""
    cap = round(run_gib - OUTSIDE_ALLOCATOR_GIB, 2)
    return cap, (
        f"the engine core's PyTorch allocator is capped at {cap:.2f} GiB ({run_gib:g} minus "
        f"~{OUTSIDE_ALLOCATOR_GIB:g} GiB it holds outside the allocator)"
    )


#: what one engine's process really peaks over its vLLM budget in a full run (GPU session 8, H100,
#: OCR-1 Gundam, one engine: 77.2 GiB at a 71.26 GiB budget): its encoder steps peak ~1.9 GiB over
#: what vLLM profiles, the allocator keeps ~1.9 GiB reserved but free, plus the CUDA context and
#: memory vLLM does not count. One engine fits it in the 10% vLLM leaves; K engines need it K times.
ENGINE_EXCESS_GIB = 5.9
#: memory the device shows in use before any process starts (GPU session 6, H100)
DEVICE_RESERVED_GIB = 0.5


def shared_gpu_utilization(
    card_gib: float, peers: int, default: float = _DEFAULTS.gpu_memory_utilization
) -> tuple[float, str]:
    """``--engines-per-gpu K`` without ``--gpu-memory-utilization``: each engine's vLLM share so
    that K engines, each peaking ``ENGINE_EXCESS_GIB`` over its budget, fit on the card; never more
    than ``default / K`` (for one engine the formula gives more than 0.9: the default stays).
    GPU session 7 (H100, 2 x 0.45) ran the second engine out of memory in its warm-up."""
    budget = (card_gib - DEVICE_RESERVED_GIB) / peers - ENGINE_EXCESS_GIB
    util = math.floor(min(default / peers, budget / card_gib) * 1e4) / 1e4
    if util * card_gib < TIGHT_BUDGET_GIB * 2:
        raise BudgetError(
            f"{peers} engines do not fit on a {card_gib:.1f} GiB GPU: each would get "
            f"{util * card_gib:.1f} GiB after the ~{ENGINE_EXCESS_GIB:g} GiB each peaks over its budget"
        )
    return util, (
        f"gpu_memory_utilization={util:g} per engine: {peers} engines share this "
        f"{card_gib:.1f} GiB GPU and each peaks ~{ENGINE_EXCESS_GIB:g} GiB over its vLLM budget "
        f"(measured), so each gets (card - {DEVICE_RESERVED_GIB:g}) / {peers} - {ENGINE_EXCESS_GIB:g} "
        f"= {util * card_gib:.1f} GiB"
    )


def shared_gpu_allocator_cap(card_gib: float, utilization: float, peers: int) -> tuple[float, str]:
    """``--engines-per-gpu K``: each engine core's PyTorch allocator cap (GiB) and the reason.

    vLLM's budget is a plan, not a limit, and an engine's caching allocator keeps what its largest
    step needed: GPU session 7 (H100, two engines at 0.45) measured the first engine at 41.7 GiB
    after its warm-up (budget 35.6), and the second, starting next to it, ran out of memory in its
    own warm-up. So each engine may use its budget plus its 1/K of what the K budgets leave of the
    card, less what it holds outside the allocator; past that the allocator releases its cached
    blocks before it grows, and the K engines together stay within the card."""
    free_share = max(0.0, card_gib * (1.0 - utilization * peers)) / peers
    cap = round(card_gib * utilization + free_share - OUTSIDE_ALLOCATOR_GIB, 2)
    return cap, (
        f"the engine core's PyTorch allocator is capped at {cap:.2f} GiB: its budget "
        f"({utilization:g} of {card_gib:.1f} GiB) plus 1/{peers} of what the {peers} engines on this GPU "
        f"leave free, minus ~{OUTSIDE_ALLOCATOR_GIB:g} GiB held outside the allocator"
    )


def _set(
    cfg: EngineConfig, changes: dict[str, object], reasons: list[str], name: str, value: object, why: str
) -> None:
    """Change ``name`` only if the user left it at its default."""
    if getattr(cfg, name) == getattr(_DEFAULTS, name) and getattr(cfg, name) != value:
        changes[name] = value
        reasons.append(f"{name}={value}: {why}")


def apply_profile(cfg: EngineConfig, gpu_mem_gib: float | None) -> tuple[EngineConfig, list[str]]:
    """Return ``cfg`` adjusted for its ``profile`` and the usable GPU memory, with the reasons."""
    profile = cfg.profile
    reasons: list[str] = []
    if profile == "auto":
        if gpu_mem_gib is None:
            return cfg, ["profile auto: GPU memory unknown, keeping the default settings"]
        if gpu_mem_gib <= LOW_VRAM_GIB:
            profile = "low-vram"
            reasons.append(f"profile auto: {gpu_mem_gib:.1f} GiB usable <= {LOW_VRAM_GIB:g} GiB -> low-vram")
        elif gpu_mem_gib <= MID_VRAM_GIB:
            changes: dict[str, object] = {}
            reasons.append(f"profile auto: {gpu_mem_gib:.1f} GiB usable -> default settings, smaller batch")
            _set(
                cfg,
                changes,
                reasons,
                "max_num_seqs",
                64,
                "KV cache for 512 sequences does not fit next to the weights",
            )
            return dataclasses.replace(cfg, **changes), reasons  # type: ignore[arg-type]
        else:
            return cfg, [f"profile auto: {gpu_mem_gib:.1f} GiB usable -> default settings"]
    if profile != "low-vram":
        return cfg, reasons
    changes = {}
    if not cfg.quantization and not cfg.enable_fp8_weights:
        changes["enable_fp8_weights"] = True
        reasons.append(
            "enable_fp8_weights: bf16 weights (~6.3 GiB) do not fit; fp8 halves them "
            "(Marlin weight-only kernels on Ampere)"
        )
    _set(cfg, changes, reasons, "kv_cache_dtype", "fp8", "fp8 KV cache halves the KV bytes per token")
    _set(cfg, changes, reasons, "max_num_seqs", 8, "a few sequences keep the KV reservation small")
    _set(cfg, changes, reasons, "max_model_len", 4096, "vision prompt + 4k output tokens is enough per page")
    _set(cfg, changes, reasons, "max_tokens", 3072, "bounded by the shorter context")
    if gpu_mem_gib is not None and gpu_mem_gib < TIGHT_BUDGET_GIB:
        step_tokens, why = (
            1024,
            f"under {TIGHT_BUDGET_GIB:g} GiB one page image per step keeps the activation "
            "reservation smallest",
        )
    else:
        step_tokens, why = 2048, "a 2k-token step budget keeps the activation peak vLLM reserves small"
    _set(cfg, changes, reasons, "max_num_batched_tokens", step_tokens, why)
    _set(
        cfg, changes, reasons, "resolution", "base", "273 vision tokens instead of ~903, smaller encoder peak"
    )
    if gpu_mem_gib is not None and gpu_mem_gib < OFFLOAD_BELOW_GIB:
        _set(
            cfg,
            changes,
            reasons,
            "cpu_offload_gb",
            round(OFFLOAD_BELOW_GIB - gpu_mem_gib + 0.5, 1),
            f"under {OFFLOAD_BELOW_GIB:g} GiB even fp8 weights do not fit: offload part of them to CPU "
            "memory (slow)",
        )
    return dataclasses.replace(cfg, **changes), reasons  # type: ignore[arg-type]


# -- the in-flight window (host side) ---------------------------------------------------------------

HOST_MEMORY_SHARE = 0.3  # of the host's available memory, for pages waiting ahead of the engine
WORKERS_ON_HOST_ENV = "RUNNER_WORKERS_ON_HOST"  # set by the --gpus launcher: workers sharing this host


def page_host_bytes(dpi: float, base_size: int = 1024, image_size: int = 640, crops: int = 6) -> int:
    """Host memory one rendered page holds while it waits for the engine: its pixels (an A4 page
    at ``dpi``) and its views' uint8 pixels, both kept by the CLI until the page's record is final
    (a retry or a resend after an engine restart reuses them), and the views once more in vLLM's
    engine core until the page is scheduled."""
    pixels = round(8.27 * dpi) * round(11.69 * dpi) * 3
    views = (base_size * base_size + crops * image_size * image_size) * 3
    return int(pixels + 2 * views)


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def inflight_window(
    max_num_seqs: int,
    dpi: float,
    workers_on_host: int = 1,
    mem_available: int | None = None,
    page_bytes: int | None = None,
) -> tuple[int, str]:
    """Pages in flight (rendering + in the engine) for a vLLM run: one full batch running plus a
    second one rendered, preprocessed and queued in vLLM, within ``HOST_MEMORY_SHARE`` of the
    host's available memory split over the workers on this host (never less than the old margin,
    a quarter batch / 16 pages).

    Why (GPU session 9, H100, two engines, PERF.md workload): with a quarter batch queued, each
    wave change (all 384 sequences of an engine finish together under forced 1000-token outputs)
    left the GPU at 52-66% busy for ~25 s while the CLI rendered, preprocessed and submitted the
    next 336 pages and post-processed the 384 finished ones in the same process; with the next
    batch already queued, vLLM starts its prefill at once and the post-processing overlaps it."""
    margin = max(16, max_num_seqs // 4)
    avail = mem_available if mem_available is not None else mem_available_bytes()
    per_page = page_bytes or page_host_bytes(dpi)
    if avail is None:
        return max_num_seqs + margin, "host memory unknown: a quarter batch queued ahead"
    fits = int(HOST_MEMORY_SHARE * avail / max(1, workers_on_host) / per_page)
    extra = max(margin, min(max_num_seqs, fits))
    why = (
        f"{extra} page(s) queued ahead of the {max_num_seqs} running "
        f"(~{per_page / 2**20:.0f} MiB each; {HOST_MEMORY_SHARE:.0%} of {avail / 2**30:.0f} GiB available"
        + (f" over {workers_on_host} workers on this host" if workers_on_host > 1 else "")
        + ")"
    )
    return max_num_seqs + extra, why
