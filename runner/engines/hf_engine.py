"""Engine stage, Transformers implementation (``--engine hf``).

In: ``PageRequest`` batches (page image, prompt mode, temperature, resolution). Out: one
``EngineOutput`` per request with the raw text (special tokens kept, EOS included when generated),
finish reason, EOS flag, token counts and seconds.

Runs Transformers' native classes: bf16 + SDPA on CUDA, float32 on CPU, at most
``--hf-batch-size`` pages per ``generate`` call.

- DeepSeek-OCR-2: ``DeepseekOcr2ForConditionalGeneration``.
- DeepSeek-OCR (v1): ``UnlimitedOcrForConditionalGeneration`` (Transformers >= 5.23). Unlimited-OCR
  is DeepSeek-OCR's architecture (SAM ViT-B, then CLIP-L fed SAM's features as patch embeddings,
  a 2048 -> 1280 linear projector, a newline embedding after every row of the tile grid and of the
  global view, the view separator, the same DeepSeek-V2 MoE language model) plus a sliding-window
  attention option; with every layer set to ``full_attention`` it is DeepSeek-OCR. Its inputs come
  from ``runner.vllm_plugin.preprocess`` (the same tensors vLLM's DeepSeek-OCR processor makes,
  checked against it), not from Unlimited-OCR's image processor (up to 32 tiles, not 6).

Checkpoints in upstream's format (``deepseek-ai/DeepSeek-OCR[-2]``, ``model_type:
deepseek_vl_v2``) load through these classes: ``native_ocr2_config`` / ``native_ocr1_config``
translate the config and Transformers renames the weights (``sam_model`` -> ``vision_tower``...).

Steps per batch: (1) group requests by resolution and temperature (both are per ``generate``
call), (2) image preprocessing + prompt expansion, (3) ``generate`` with the windowed n-gram guard,
(4) split each row at EOS and decode with special tokens kept.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.adapters import DEEPSEEK_OCR_2, ModelAdapter, Resolution, SpecialTokenIds
from runner.config import EngineConfig, RunConfig
from runner.engines.base import BatchEngine, EngineDied, EngineUnavailable
from runner.engines.guard import GuardParams, reference_banned
from runner.records import EngineOutput, PageRequest

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install '.[hf]'"
# The vision tower has learned queries for exactly these view sizes (12x12 and 16x16 tokens).
SUPPORTED_VIEW_SIZES = (768, 1024)
# Upstream's config.json names the encoder "qwen2-0-5b" and gives only its width; these are the
# remaining Qwen2-0.5B sizes (a config may override them in the same block).
QWEN2_0_5B = {"layers": 24, "heads": 14, "kv_heads": 2, "intermediate_size": 4864, "rope_theta": 1_000_000.0}
# DeepSeek-OCR (v1): upstream's config.json names these blocks; vLLM builds exactly these sizes.
SAM_VIT_B = {"width": 768, "layers": 12, "heads": 12, "global_attn_indexes": [2, 5, 8, 11]}
CLIP_L_14_224 = {"width": 1024, "layers": 24, "heads": 16, "image_size": 224, "patch_size": 14}


# --------------------------------------------------------------------------------------------
# Repetition guard
# --------------------------------------------------------------------------------------------


class WindowedNGramGuard:
    """Transformers logits processor: upstream's windowed no-repeat n-gram rule, per batch row.

    Transformers' own ``no_repeat_ngram_size`` searches the whole sequence (prompt included), which
    bans legitimate repeats across a long page; upstream's rule (``runner.engines.guard``, shared
    with the vLLM engine) looks only at the last ``window`` generated tokens and never bans the
    table tags. ``prompt_len`` is the left-padded prompt width: later columns are generated."""

    def __init__(self, prompt_len: int, ngram_size: int, window: int, exempt: Iterable[int]) -> None:
        self.prompt_len = prompt_len
        self.params = GuardParams(ngram_size, window, tuple(sorted(set(exempt))))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] < self.params.ngram_size:
            return scores
        for row, seq in enumerate(generated[:, -self.params.window :].tolist()):
            banned = reference_banned(seq, self.params)
            if banned:
                scores[row, sorted(banned)] = float("-inf")
        return scores


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------


def require_hf_dependencies() -> None:
    """Raise ``EngineUnavailable`` at once (no heavy import) when torch/transformers are missing."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailable(
            f"--engine hf needs {' and '.join(missing)}: {INSTALL_HINT} "
            "(or use --engine vllm on a supported GPU, --engine text for the PDF text layer)"
        )
    import transformers

    if not hasattr(transformers, "DeepseekOcr2ForConditionalGeneration"):
        raise EngineUnavailable(
            f"transformers {transformers.__version__} has no native DeepSeek-OCR-2; "
            f"upgrade with {INSTALL_HINT} (needs transformers>=5)"
        )


def _require_ocr1_class() -> Any:
    import transformers

    cls = getattr(transformers, "UnlimitedOcrForConditionalGeneration", None)
    if cls is None:
        raise EngineUnavailable(
            f"transformers {transformers.__version__} cannot run DeepSeek-OCR (v1): it needs "
            f"UnlimitedOcrForConditionalGeneration (transformers>=5.23); upgrade with {INSTALL_HINT}"
        )
    return cls


def native_ocr2_config(config: dict[str, Any]) -> dict[str, Any]:
    """``DeepseekOcr2Config`` keyword arguments for a DeepSeek-OCR-2 ``config.json``.

    A Transformers-format config (``model_type: deepseek_ocr2``) is returned unchanged; an
    upstream one (``deepseek_vl_v2`` with ``language_config``) is translated."""
    if config.get("model_type") == "deepseek_ocr2":
        return _as_is(config)
    lang = _language_config(config, "DeepSeek-OCR-2")
    text = _native_text_config(lang)
    width = (config.get("vision_config") or {}).get("width") or {}
    sam_w = width.get("sam_vit_b") or {}
    enc_w = {**QWEN2_0_5B, **(width.get("qwen2-0-5b") or {})}
    enc_dim = int(enc_w.get("dim", 896))
    channels = list(sam_w.get("downsample_channels") or [512, enc_dim])
    channels[-1] = enc_dim  # upstream's config still says 1024 (OCR-1's CLIP); the encoder takes its width
    sam = {"downsample_channels": channels, **_native_sam_sizes(sam_w)}
    encoder = {
        "hidden_size": enc_dim,
        "num_hidden_layers": int(enc_w["layers"]),
        "num_attention_heads": int(enc_w["heads"]),
        "num_key_value_heads": int(enc_w["kv_heads"]),
        "intermediate_size": int(enc_w["intermediate_size"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(enc_w["rope_theta"])},
        "vocab_size": 1,  # the encoder embeds image features, never token ids
    }
    return {"text_config": text, "vision_config": {"sam_config": sam, "encoder_config": encoder}}


def native_ocr1_config(config: dict[str, Any]) -> dict[str, Any]:
    """``UnlimitedOcrConfig`` keyword arguments for a DeepSeek-OCR (v1) ``config.json``.

    A Transformers-format config (``model_type: unlimited_ocr``) is returned unchanged; an upstream
    one (``deepseek_vl_v2``, ``deeplip_b_l``) is translated: SAM and CLIP-L sizes from its
    ``vision_config.width`` blocks (defaults: the published sizes), the language model as for
    OCR-2, every decoder layer ``full_attention`` (DeepSeek-OCR attends to the whole sequence; the
    sliding window, required by the config class, is then unused) and an untied ``lm_head``."""
    if config.get("model_type") == "unlimited_ocr":
        return _as_is(config)
    lang = _language_config(config, "DeepSeek-OCR")
    text = _native_text_config(lang)
    n_layers = int(lang["num_hidden_layers"])
    text.update(
        layer_types=["full_attention"] * n_layers,
        sliding_window=int(lang.get("max_position_embeddings") or 8192),
        tie_word_embeddings=False,
    )
    width = (config.get("vision_config") or {}).get("width") or {}
    sam_w = {**SAM_VIT_B, **(width.get("sam_vit_b") or {})}
    clip_w = {**CLIP_L_14_224, **(width.get("clip-l-14-224") or {})}
    sam = {
        "downsample_channels": list(sam_w.get("downsample_channels") or [512, 1024]),
        **_native_sam_sizes(sam_w),
    }
    clip_dim = int(clip_w["width"])
    encoder = {
        "hidden_size": clip_dim,
        "intermediate_size": int(clip_w.get("intermediate_size", 4 * clip_dim)),
        "num_hidden_layers": int(clip_w["layers"]),
        "num_attention_heads": int(clip_w["heads"]),
        "image_size": int(clip_w["image_size"]),
        "patch_size": int(clip_w["patch_size"]),
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
    }
    return {
        "text_config": text,
        "vision_config": {"sam_config": sam, "encoder_config": encoder},
        "tie_word_embeddings": False,
    }


def _as_is(config: dict[str, Any]) -> dict[str, Any]:
    """A Transformers-format config's keyword arguments."""
    skip = ("architectures", "model_type", "transformers_version")
    return {k: v for k, v in config.items() if k not in skip}


def _language_config(config: dict[str, Any], model: str) -> dict[str, Any]:
    lang = config.get("language_config")
    if not isinstance(lang, dict):
        raise EngineUnavailable(f"config.json is neither a Transformers nor an upstream {model} config")
    return lang


def _native_sam_sizes(sam_w: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for src, dst in (
        ("width", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("global_attn_indexes", "global_attn_indexes"),
        ("output_channels", "output_channels"),
    ):
        if src in sam_w:
            out[dst] = sam_w[src]
    return out


def _native_text_config(lang: dict[str, Any]) -> dict[str, Any]:
    """The language model's Transformers config from upstream's ``language_config`` (the same
    DeepSeek-V2 MoE in both models)."""
    n_dense = int(lang.get("first_k_dense_replace", 0))
    n_layers = int(lang["num_hidden_layers"])
    text = {
        k: lang[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "n_routed_experts",
            "n_shared_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
            "topk_method",
            "n_group",
            "topk_group",
            "routed_scaling_factor",
            "rms_norm_eps",
        )
        if lang.get(k) is not None
    }
    text["mlp_layer_types"] = ["dense" if i < n_dense else "sparse" for i in range(n_layers)]
    return text


def view_kwargs(res: Resolution) -> dict[str, Any]:
    """Image-processor (and prompt-expansion) arguments for a resolution mode."""
    for size in {res.base_size, res.image_size}:
        if size not in SUPPORTED_VIEW_SIZES:
            raise ValueError(
                f"resolution {res.name!r} uses a {size}px view; Transformers' DeepSeek-OCR-2 supports "
                f"{SUPPORTED_VIEW_SIZES} only"
            )
    if res.crop_mode:
        return {
            "crop_to_patches": True,
            "size": {"height": res.base_size, "width": res.base_size},
            "tile_size": res.image_size,
        }
    # Without tiles the processor sizes the single view by ``tile_size``.
    return {
        "crop_to_patches": False,
        "size": {"height": res.base_size, "width": res.base_size},
        "tile_size": res.base_size,
    }


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"--device {requested}: CUDA is not available here (use --device cpu)")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: str) -> Any:
    """The checkpoint's ``tokenizer.json`` as a fast tokenizer.

    Read directly rather than through ``AutoTokenizer``: that resolves upstream's config.json,
    whose ``auto_map`` points at remote code (a trust prompt) and whose ``deepseek_vl_v2`` type
    Transformers does not know (a warning on every start)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


@dataclass(frozen=True)
class LoadedModel:
    """What ``HfEngine`` runs: the model and its tokenizer, processor and special-token ids."""

    model: Any
    tokenizer: Any
    processor: Any  # DeepSeek-OCR-2's Transformers processor; None for DeepSeek-OCR
    adapter: ModelAdapter
    special: SpecialTokenIds
    device: str
    dtype: Any
    prompt_prefix: str  # BOS text when the tokenizer does not add BOS itself (upstream's does not)


def load_model(ec: EngineConfig) -> LoadedModel:
    """Resolve, load and check the model named by ``ec`` (``load_format="dummy"``: random weights)."""
    import torch
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

    from runner.model_files import resolve_model

    files = resolve_model(ec.model, ec.cache_dir)
    if files.adapter.key == DEEPSEEK_OCR_2.key:
        cls: Any = DeepseekOcr2ForConditionalGeneration
        config: Any = DeepseekOcr2Config(**native_ocr2_config(files.config))
    else:
        from transformers import UnlimitedOcrConfig

        cls = _require_ocr1_class()
        config = UnlimitedOcrConfig(**native_ocr1_config(files.config))
    device = pick_device(ec.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = load_tokenizer(files.path)
    special = files.adapter.resolve_special_tokens(tokenizer)
    config.image_token_id = special.image
    torch.manual_seed(ec.seed)
    model: Any
    if ec.load_format == "dummy":
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model, info = cls.from_pretrained(
            files.path, config=config, dtype=dtype, attn_implementation="sdpa", output_loading_info=True
        )
        _check_loading_info(info, files.path)
        model = model.to(device)
    model.eval()
    return attach_model(model, tokenizer, files.adapter, device=device, dtype=dtype, special=special)


# Checkpoint entries a model may lack or ignore without changing its output.
_IGNORABLE = re.compile(r"(^|\.)(patch_embedding\.weight|position_ids|rotary_emb\.inv_freq)$")


def _check_loading_info(info: dict[str, Any], path: str) -> None:
    """Refuse a checkpoint whose weights did not all land: a missing tensor would silently stay
    random (what ``from_pretrained`` only warns about). Upstream's CLIP ``patch_embedding`` is
    unused (SAM's features replace it) and may be in the file or not."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not _IGNORABLE.search(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _IGNORABLE.search(k))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        parts = [
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise EngineUnavailable(f"{path}: the checkpoint does not match the model; " + "; ".join(parts))


def attach_model(
    model: Any,
    tokenizer: Any,
    adapter: ModelAdapter = DEEPSEEK_OCR_2,
    *,
    device: str,
    dtype: Any,
    special: SpecialTokenIds | None = None,
) -> LoadedModel:
    """Wrap an already built model (benchmarks build full-size random models in memory)."""
    from transformers.models.deepseek_ocr2 import DeepseekOcr2ImageProcessorPil, DeepseekOcr2Processor

    special = special or adapter.resolve_special_tokens(tokenizer)
    if model.config.image_token_id != special.image:
        raise EngineUnavailable(
            f"model image_token_id {model.config.image_token_id} != tokenizer's <image> id {special.image}"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [bos]
    # The PIL backend: PyPI torchvision does not import next to every torch build, and the
    # image work is small next to generation.
    processor = (
        DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tokenizer)
        if adapter.key == DEEPSEEK_OCR_2.key
        else None  # DeepSeek-OCR: runner.vllm_plugin.preprocess (see _ocr1_inputs)
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        adapter=adapter,
        special=special,
        device=device,
        dtype=dtype,
        prompt_prefix="" if adds_bos or bos is None else tokenizer.bos_token,
    )


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


class HfEngine(BatchEngine):
    """Transformers engine: synchronous batches of at most ``hf_batch_size`` pages."""

    name = "hf"
    needs_pixels = True
    needs_text_markdown = False

    def __init__(self, config: RunConfig | EngineConfig) -> None:
        super().__init__()
        require_hf_dependencies()
        self.engine_config = config.engine_config if isinstance(config, RunConfig) else config
        self.max_batch = self.engine_config.hf_batch_size
        self.loaded: LoadedModel | None = None

    def start(self) -> None:
        if self.loaded is None:
            t0 = time.perf_counter()
            self.loaded = load_model(self.engine_config)
            log.info(
                "hf engine: %s on %s (%s) loaded in %.1fs",
                self.engine_config.model,
                self.loaded.device,
                str(self.loaded.dtype).removeprefix("torch."),
                time.perf_counter() - t0,
            )
        try:  # fail before the first page on a mode this model or processor cannot run
            res = self.loaded.adapter.resolution(self.engine_config.resolution)
            if self.loaded.processor is not None:
                view_kwargs(res)
        except ValueError as e:
            raise EngineUnavailable(f"--resolution: {e}") from e

    def attach(self, loaded: LoadedModel) -> None:
        """Use an already loaded model (benchmarks, tests sharing one model between configs)."""
        self.loaded = loaded

    def restart(self) -> None:
        """After ``EngineDied``: drop queued work and the model; the next batch reloads it."""
        super().restart()
        self._unload()

    def close(self) -> None:
        super().close()
        self._unload()

    def _unload(self) -> None:
        on_cuda = self.loaded is not None and str(self.loaded.device).startswith("cuda")
        self.loaded = None
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def generate_batch(self, batch: list[PageRequest]) -> list[EngineOutput]:
        if self.loaded is None:
            self.start()
        # (1) one generate call per (resolution, temperature): both apply to a whole call.
        groups: dict[tuple[str | None, float], list[PageRequest]] = {}
        for req in batch:
            groups.setdefault((req.resolution or self.engine_config.resolution, req.temperature), []).append(
                req
            )
        done: dict[str, EngineOutput] = {}
        for (resolution, temperature), reqs in groups.items():
            for out in self._run_group(reqs, resolution, temperature):
                done[out.request_id] = out
        return [done[r.request_id] for r in batch]

    def _run_group(
        self, reqs: list[PageRequest], resolution: str | None, temperature: float
    ) -> list[EngineOutput]:
        import torch

        try:
            return self._generate(reqs, resolution, temperature)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            if len(reqs) > 1:  # retry page by page before giving up on any of them
                log.warning("hf engine: CUDA OOM on a batch of %d; retrying one page at a time", len(reqs))
                return [o for r in reqs for o in self._run_group([r], resolution, temperature)]
            return [_error(reqs[0], f"CUDA out of memory: {e}")]
        except (RuntimeError, ValueError) as e:
            if "CUDA error" in str(e):  # device-side faults poison the context: restart the engine
                raise EngineDied(f"hf engine: {e}") from e
            log.warning("hf engine: generation failed for %d request(s): %s", len(reqs), e)
            return [_error(r, f"{type(e).__name__}: {e}") for r in reqs]

    def _generate(
        self, reqs: list[PageRequest], resolution: str | None, temperature: float
    ) -> list[EngineOutput]:
        import torch
        from transformers import LogitsProcessorList

        lm = self.loaded
        assert lm is not None
        ec = self.engine_config
        t0 = time.perf_counter()
        # (2) images and prompts; the processor expands <image> to the view's token count.
        images = [_page_image(r) for r in reqs]
        prompts = [lm.prompt_prefix + lm.adapter.prompt(r.prompt_mode) for r in reqs]
        if lm.processor is None:
            inputs = _ocr1_inputs(lm, images, prompts, resolution)
        else:
            res = lm.adapter.resolution(resolution)
            inputs = lm.processor(
                images=images, text=prompts, padding=True, return_tensors="pt", **view_kwargs(res)
            )
        inputs = {k: v.to(lm.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        for key in ("pixel_values", "pixel_values_local"):
            if key in inputs:
                inputs[key] = inputs[key].to(lm.dtype)
        prompt_len = int(inputs["input_ids"].shape[1])
        max_new = min(ec.max_tokens, max(1, ec.max_model_len - prompt_len))
        # (3) generate
        processors = LogitsProcessorList()
        if ec.guard:
            processors.append(
                WindowedNGramGuard(prompt_len, ec.ngram_size, ec.ngram_window, lm.special.whitelist)
            )
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "eos_token_id": lm.special.eos,
            "pad_token_id": lm.tokenizer.pad_token_id,
            "logits_processor": processors,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        if ec.ignore_eos:
            gen_kwargs["min_new_tokens"] = max_new  # EOS is masked until the forced length
        with torch.inference_mode():
            out = lm.model.generate(**inputs, **gen_kwargs)
        seconds = (time.perf_counter() - t0) / len(reqs)
        # (4) split at EOS, decode with special tokens kept (grounding tags must survive)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for req, row, n_prompt in zip(reqs, out[:, prompt_len:].tolist(), prompt_tokens):
            tokens, stopped = _cut_at_eos(row, lm.special.eos)
            results.append(
                EngineOutput(
                    request_id=req.request_id,
                    text=lm.tokenizer.decode(tokens, skip_special_tokens=False),
                    finish_reason="stop" if stopped else "length",
                    stopped_by_eos=stopped,
                    prompt_tokens=int(n_prompt),
                    output_tokens=len(tokens),
                    seconds=seconds,
                )
            )
        return results


def _ocr1_inputs(
    lm: LoadedModel, images: list[Any], prompts: list[str], resolution: str | None
) -> dict[str, Any]:
    """DeepSeek-OCR model inputs, left-padded: the views and tile grids of ``prepare_image`` (the
    tensors vLLM's processor makes, as bfloat16 values) and each prompt's ``<image>`` token
    expanded to the page's image-token count (upstream's ``tokenize_with_images``)."""
    import torch

    from runner.vllm_plugin.preprocess import as_bf16_tensor, prepare_image, view_spec

    prepared = [prepare_image(im, view_spec(lm.adapter, resolution)) for im in images]
    rows: list[list[int]] = []
    for text, page in zip(prompts, prepared):
        ids = list(lm.tokenizer(text, add_special_tokens=False).input_ids)
        if ids.count(lm.special.image) != 1:
            raise ValueError(f"prompt {text!r} must hold exactly one <image> token")
        at = ids.index(lm.special.image)
        rows.append(ids[:at] + [lm.special.image] * page.num_image_tokens + ids[at + 1 :])
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    out: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": torch.stack([as_bf16_tensor(p.global_view) for p in prepared]),
    }
    counts = [int(p.crops.shape[0]) for p in prepared]
    if any(counts):
        out["pixel_values_local"] = torch.cat([as_bf16_tensor(p.crops) for p in prepared if p.crops.shape[0]])
        out["num_local_patches"] = counts
        out["patches_grid"] = [list(p.tiles) for p in prepared]
    return out


def _cut_at_eos(tokens: list[int], eos: int) -> tuple[list[int], bool]:
    """Generated tokens up to and including the first EOS (rows that stopped early are padded)."""
    if eos in tokens:
        return tokens[: tokens.index(eos) + 1], True
    return tokens, False


def _page_image(req: PageRequest) -> Any:
    image = req.image_override if req.image_override is not None else req.image.to_pil()
    return image.convert("RGB") if image.mode != "RGB" else image


def _error(req: PageRequest, message: str) -> EngineOutput:
    return EngineOutput(request_id=req.request_id, text="", finish_reason="error", error=message)
