"""Time vLLM's SAM image encoder (DeepSeek-OCR's `build_sam_vit_b`) with upstream's attention and
with the bias-free attention of runner/vllm_plugin/sam_attention.py (bias folded into widened
heads) under each attention kernel, on the same random weights and inputs (GPU machine; needs
vLLM). One JSON line per variant; appended to --jsonl if given.

    python tools/bench_sam.py --pages 18 --crops-per-page 6 --jsonl OUT/benchmarks.jsonl \
        --variants upstream,bias-free+sdpa,bias-free+fa3 [--tower]

Variants: ``upstream``; ``bias-free`` (the engine's default kernel choice) or ``bias-free+K``
for ``RUNNER_SAM_KERNEL=K`` (sdpa, fa3, cudnn); ``fused`` / ``fused+K``: the same widened heads
built by runner/vllm_plugin/sam_fused.py's Triton kernels (``+wN``: N warps per program);
``+compile`` appended: torch.compile of the
encoder. ``--tower`` times the whole OCR-1 vision tower per view (SAM, then vLLM's CLIP-L on
SAM's features, then the projector: the batched encoder's ``_encode_views``) instead of SAM alone.

The workload is one prefill step of the PERF.md run: ~18 Gundam pages, each a 1024² global view
and up to six 640² crops (the engine's profile: SAM's attention was ~2/3 of such a step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _config_context() -> contextlib.AbstractContextManager[object]:
    try:
        from vllm.config import VllmConfig, set_current_vllm_config

        return set_current_vllm_config(VllmConfig())
    except Exception:
        return contextlib.nullcontext()


def random_init(sam: torch.nn.Module) -> torch.nn.Module:
    """vLLM leaves some SAM weights uninitialised (torch.empty) and zeroes the rel-pos tables:
    give every parameter a value, the tables large enough to matter (also used by the tests)."""
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return sam


def build_tower(
    dev: torch.device, model_dir: str | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """vLLM's CLIP-L and projector of DeepSeek-OCR (random weights) as a function of (views, SAM
    features) -> projected features, like the batched encoder's ``_encode_views``. vLLM's
    parallel layers need its (one-process) distributed state."""
    import tempfile

    from transformers import CLIPVisionConfig
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.model_executor.models.deepencoder import DeepCLIPVisionTransformer
    from vllm.model_executor.models.deepseek_vl2 import MlpProjector
    from vllm.transformers_utils.configs.deepseek_vl2 import MlpProjectorConfig

    init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        backend="nccl",
        distributed_init_method=f"file://{tempfile.mktemp(prefix='bench_sam_')}",
    )
    ensure_model_parallel_initialized(1, 1)
    proj_cfg = {"input_dim": 2048, "n_embed": 1280, "projector_type": "linear"}
    if model_dir:
        proj_cfg = json.loads((Path(model_dir) / "config.json").read_text())["projector_config"]
    torch.set_default_dtype(torch.bfloat16)  # vLLM builds layers in the model dtype
    try:
        clip = DeepCLIPVisionTransformer(
            config=CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=16,
                num_hidden_layers=24,
                image_size=224,
                patch_size=14,
                projection_dim=512,
                layer_norm_eps=1e-5,
            ),
            prefix="vision_model",
        )
        projector = MlpProjector(MlpProjectorConfig(**proj_cfg))
    finally:
        torch.set_default_dtype(torch.float32)
    clip = random_init(clip.to(dev, torch.bfloat16).eval())
    projector = random_init(projector.to(dev, torch.bfloat16).eval())

    def tower(x: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        f2 = clip(x, f1)
        return projector(torch.cat((f2[:, 1:], f1.flatten(2).permute(0, 2, 1)), dim=-1))

    return tower


def _top_kernels(fn: Callable[[], object], n: int = 12) -> list[dict[str, object]]:
    """One call of ``fn`` under torch's profiler: the ``n`` kernels with the most CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            rows.append({"kernel": ev.key[:90], "ms": round(t / 1e3, 2), "calls": ev.count})
    rows.sort(key=lambda r: -float(r["ms"]))  # type: ignore[arg-type]
    return rows[:n]


def run(
    pages: int,
    crops: int,
    repeats: int,
    chunk: int,
    variants: list[str],
    profile: bool,
    tower_model: str | None = None,
    tower: bool = False,
) -> list[dict[str, object]]:
    from vllm.model_executor.models.deepencoder import build_sam_vit_b

    from runner.vllm_plugin.sam_attention import patch_sam_attention
    from runner.vllm_plugin.sam_fused import patch_sam_blocks

    dev = torch.device("cuda")
    torch.manual_seed(0)
    sam = random_init(build_sam_vit_b().to(dev, torch.bfloat16).eval())
    g = torch.randn(pages, 3, 1024, 1024, device=dev, dtype=torch.bfloat16)
    c = torch.randn(pages * crops, 3, 640, 640, device=dev, dtype=torch.bfloat16)

    rest = build_tower(dev, tower_model) if tower else None

    def views(x: torch.Tensor) -> torch.Tensor:
        f1 = sam(x)
        return f1 if rest is None else rest(x, f1)

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        outs_g = [views(g[i : i + chunk]) for i in range(0, len(g), chunk)]
        outs_c = [views(c[i : i + chunk]) for i in range(0, len(c), chunk)]
        return torch.cat(outs_g), torch.cat(outs_c)

    results = []
    ref: tuple[torch.Tensor, torch.Tensor] | None = None
    patched = fused_blocks = 0
    eager = sam
    for variant in variants:
        if variant != "upstream" and not patched:
            patched = patch_sam_attention(eager)
            os.environ["RUNNER_SAM_FUSED"] = "auto"
            fused_blocks = patch_sam_blocks(eager)
        # "bias-free[+KERNEL]": the bias folded into widened heads, attention by KERNEL (sam_attention's
        # RUNNER_SAM_KERNEL; default: the engine's choice); "fused[+KERNEL]": the same heads built by
        # sam_fused's Triton kernels inside each block; "+compile": torch.compile (inductor) of the
        # whole encoder, batch dynamic
        parts = variant.split("+")
        kernels = [p for p in parts[1:] if p != "compile" and not p.startswith("w")]
        os.environ["RUNNER_SAM_KERNEL"] = kernels[0] if kernels else "auto"
        os.environ["RUNNER_SAM_FUSED"] = "auto" if parts[0] == "fused" else "0"
        warps = [p[1:] for p in parts[1:] if p.startswith("w")]  # "fused+w8": RUNNER_SAM_FUSED_WARPS
        if warps:
            os.environ["RUNNER_SAM_FUSED_WARPS"] = warps[0]
        else:
            os.environ.pop("RUNNER_SAM_FUSED_WARPS", None)
        sam = torch.compile(eager, dynamic=True) if "compile" in parts[1:] else eager
        with torch.no_grad():
            t_warm = time.perf_counter()
            try:
                encode()  # warm-up (kernel selection, allocator; compilation for "+compile")
            except Exception as e:  # a variant that cannot run is reported, not fatal
                err = f"{type(e).__name__}: {e}"[:400]
                results.append(
                    {"bench": "vision-tower" if tower else "sam-encoder", "variant": variant, "error": err}
                )
                continue
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t_warm
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = encode()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / repeats
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        from runner.vllm_plugin.sam_attention import kernel

        row: dict[str, object] = {
            "bench": "vision-tower" if tower else "sam-encoder",
            "variant": variant,
            "sam_kernel": kernel() if variant != "upstream" else None,
            "pages": pages,
            "crops_per_page": crops,
            "chunk": chunk,
            "ms_per_step": round(dt * 1e3, 1),
            "ms_per_page": round(dt * 1e3 / pages, 2),
            "activation_peak_gib": round(peak, 2),
            "warmup_s": round(warm_s, 1),
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
        }
        if variant != "upstream" and ref is not None:
            row["layers_patched"] = patched
            row["blocks_fused"] = fused_blocks if parts[0] == "fused" else 0
            rel = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, ref))
            row["rel_diff_vs_upstream"] = round(rel, 5)
        else:
            ref = out
        if profile:
            with torch.no_grad():
                row["top_kernels"] = _top_kernels(encode)
        results.append(row)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=18)
    ap.add_argument("--crops-per-page", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=32, help="images per encoder call (RUNNER_ENCODER_BATCH)")
    ap.add_argument(
        "--variants",
        default="upstream,bias-free",
        help="comma list: upstream, bias-free[+sdpa|+fa3|+cudnn][+compile]",
    )
    ap.add_argument(
        "--tower", action="store_true", help="SAM + CLIP-L + projector (OCR-1's vision tower), not SAM alone"
    )
    ap.add_argument("--model-dir", help="a DeepSeek-OCR folder: the projector's config (default: upstream's)")
    ap.add_argument("--profile", action="store_true", help="each variant's top CUDA kernels (torch profiler)")
    ap.add_argument("--jsonl")
    a = ap.parse_args()
    with _config_context():  # vLLM's custom layers read the current config, also in forward
        rows = run(
            a.pages,
            a.crops_per_page,
            a.repeats,
            a.chunk,
            a.variants.split(","),
            a.profile,
            a.model_dir,
            a.tower,
        )
    for r in rows:
        print(json.dumps(r))
    if a.jsonl:
        with open(a.jsonl, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    for r in rows:
        ms = r.get("ms_per_page", r.get("error"))
        peak = r.get("activation_peak_gib")
        print(f"{r['bench']}, {r['variant']}: {ms} ms/page, activation peak {peak} GiB")


if __name__ == "__main__":
    main()
