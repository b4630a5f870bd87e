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

from runner.config import EngineConfig

_DEFAULTS = EngineConfig()
LOW_VRAM_GIB = 12.0  # at or below this, ``auto`` picks the low-VRAM profile
# Measured (H200, vLLM 0.26, OCR-1, this profile; tmp_pdf_runs/GPU_NOTES.md): fp8 weights 3.56 GiB,
# activation peak 0.5 GiB, CUDA graphs 0.07 GiB, non-torch ~0.25 GiB -> ~4.4 GiB before any KV
# cache. Below 5 GiB only CPU offload helps. (It used to start at 6 GiB: a 6 GiB budget then
# offloaded for nothing, and vLLM 0.26's offload fails with --load-format dummy.)
OFFLOAD_BELOW_GIB = 5.0
MID_VRAM_GIB = 30.0  # at or below this, ``auto`` trims the batch


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
    _set(
        cfg,
        changes,
        reasons,
        "max_num_batched_tokens",
        2048,
        "a 2k-token step budget keeps the activation peak vLLM reserves small",
    )
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
