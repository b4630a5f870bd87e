"""A vLLM multimodal processor for DeepSeek-OCR / OCR-2 that accepts precomputed inputs (engine stage).

Upstream's processor turns a PIL image into tensors in the process that feeds the engine (~120-235
ms per A4 page, serial). Here the render workers compute the very same tensors
(``runner.vllm_plugin.preprocess``) and the request carries them as
``multi_modal_data={"image": {"pixel_values", "images_crop", "images_spatial_crop"}}``; this
processor only tokenises the prompt and lets vLLM expand the ``<image>`` placeholder to the token
count implied by the tensors. PIL images still go through upstream's path unchanged (vLLM's own
profiling uses them).

Because the token count comes from the tensors, the resolution mode is per request here, not the
process-global constant of upstream's processor.

``register()`` installs the subclasses for both architectures in the current process (the
process that runs vLLM's input processing). The model classes are upstream's with two overrides:
the vision encoder runs over all pages of a step at once (``batched_encoder``;
``RUNNER_BATCHED_ENCODER=0`` keeps upstream's per-page loop), and SAM's relative-position
attention runs without a materialised bias (``sam_attention``; ``RUNNER_FAST_SAM_ATTENTION=0``);
OCR-2's encoder mask is built without a per-query Python loop (``encoder_mask``;
``RUNNER_FAST_ENCODER_MASK=0``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm import ModelRegistry
from vllm.model_executor.models.deepseek_ocr import (
    DeepseekOCRDummyInputsBuilder,
    DeepseekOCRForCausalLM,
    DeepseekOCRMultiModalProcessor,
    DeepseekOCRProcessingInfo,
)
from vllm.model_executor.models.deepseek_ocr2 import (
    DeepseekOCR2DummyInputsBuilder,
    DeepseekOCR2ForCausalLM,
    DeepseekOCR2MultiModalProcessor,
    DeepseekOCR2ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    DictEmbeddingItems,
    ImageEmbeddingItems,
    ImageProcessorItems,
    ModalityDataItems,
    MultiModalDataItems,
    MultiModalDataParser,
)
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from runner.vllm_plugin.batched_encoder import BatchedOCR2Mixin, BatchedOCRMixin, crops_per_image
from runner.vllm_plugin.encoder_mask import patch_encoder_mask
from runner.vllm_plugin.memory_cap import apply_from_env as apply_memory_cap
from runner.vllm_plugin.preprocess import ViewSpec, num_image_tokens
from runner.vllm_plugin.sam_attention import patch_sam_attention
from runner.vllm_plugin.sam_fused import mode as fused_mode
from runner.vllm_plugin.sam_fused import patch_sam_blocks

_log = logging.getLogger("vllm.deepseek_ocr_pipeline")

IMAGE_TOKEN = "<image>"
PREPARED_FIELDS = frozenset({"pixel_values", "images_crop", "images_spatial_crop"})


def prepared_fields_config(hf_inputs: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
    """Upstream's field layout (``_get_mm_fields_config``), as a function of the tensors."""
    spatial = hf_inputs.get("images_spatial_crop", torch.empty((0, 2), dtype=torch.long))
    per_image = crops_per_image(spatial)
    return dict(
        pixel_values=MultiModalFieldConfig.batched("image"),
        images_spatial_crop=MultiModalFieldConfig.batched("image"),
        images_crop=MultiModalFieldConfig.flat_from_sizes("image", per_image),
    )


class PreparedImageParser(MultiModalDataParser):
    """Accepts a dict of precomputed tensors as an image item; anything else goes upstream."""

    def _parse_image_data(self, data: Any) -> ModalityDataItems[Any, Any] | None:
        if isinstance(data, dict):
            return DictEmbeddingItems(
                data,
                modality="image",
                required_fields=set(PREPARED_FIELDS),
                fields_factory=prepared_fields_config,
            )
        return super()._parse_image_data(data)


def _prepared_token_count(item: Mapping[str, torch.Tensor], strategy: str) -> int:
    base = int(item["pixel_values"].shape[-1])
    crops = item.get("images_crop")
    size = int(crops.shape[-1]) if crops is not None and crops.ndim == 4 else base
    wt, ht = (int(v) for v in item["images_spatial_crop"].reshape(-1)[:2].tolist())
    return num_image_tokens(ViewSpec(base, size, crop_mode=(wt, ht) != (1, 1), strategy=strategy), (wt, ht))


class _PreparedMixin:
    """Shared overrides; ``_strategy`` is "v1" (OCR) or "v2" (OCR-2)."""

    _strategy = "v1"
    info: Any

    def _call_hf_processor(
        self,
        prompt: str,
        mm_data: Mapping[str, object],
        mm_kwargs: Mapping[str, object],
        tok_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        if mm_data or IMAGE_TOKEN not in prompt:
            return super()._call_hf_processor(prompt, mm_data, mm_kwargs, tok_kwargs)  # type: ignore[misc]
        # Same ids as upstream's ``tokenize_with_images`` before it expands the image token:
        # BOS, then each text piece encoded without special tokens, one <image> id between pieces.
        tok = self.info.get_tokenizer()
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        ids: list[int] = [tok.bos_token_id]
        for k, piece in enumerate(prompt.split(IMAGE_TOKEN)):
            if k:
                ids.append(image_id)
            ids.extend(tok.encode(piece, add_special_tokens=False))
        return BatchFeature({"input_ids": torch.tensor([ids], dtype=torch.long)})

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        images = mm_items.get_items("image", (DictEmbeddingItems, ImageEmbeddingItems, ImageProcessorItems))
        if not isinstance(images, DictEmbeddingItems):
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        image_id = self.info.get_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
        strategy = self._strategy

        def replacement(item_idx: int) -> list[int]:
            return [image_id] * _prepared_token_count(images.get(item_idx), strategy)

        return [PromptReplacement(modality="image", target=[image_id], replacement=replacement)]


class FastOCRProcessingInfo(DeepseekOCRProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return PreparedImageParser(expected_hidden_size=self._get_expected_hidden_size())


class FastOCR2ProcessingInfo(DeepseekOCR2ProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return PreparedImageParser(expected_hidden_size=self._get_expected_hidden_size())


class FastOCRMultiModalProcessor(_PreparedMixin, DeepseekOCRMultiModalProcessor):
    _strategy = "v1"


class FastOCR2MultiModalProcessor(_PreparedMixin, DeepseekOCR2MultiModalProcessor):
    _strategy = "v2"


class _PreparedModel:
    """Both model classes: cap the allocator, patch SAM's attention (and OCR-2's encoder mask) once
    vLLM has built them."""

    # The keyword-only ``vllm_config`` signature is how vLLM recognises a current model class
    # (``*args, **kwargs`` makes it guess an old-style one and fail).
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]  # the vLLM model after us in the MRO
        _prepare_model(self)


@MULTIMODAL_REGISTRY.register_processor(
    FastOCRMultiModalProcessor, info=FastOCRProcessingInfo, dummy_inputs=DeepseekOCRDummyInputsBuilder
)
class FastDeepseekOCRForCausalLM(_PreparedModel, BatchedOCRMixin, DeepseekOCRForCausalLM):
    """Upstream's model; its input processor, the batching of its vision encoder and SAM's
    attention kernel (``sam_attention``) differ."""


@MULTIMODAL_REGISTRY.register_processor(
    FastOCR2MultiModalProcessor, info=FastOCR2ProcessingInfo, dummy_inputs=DeepseekOCR2DummyInputsBuilder
)
class FastDeepseekOCR2ForCausalLM(_PreparedModel, BatchedOCR2Mixin, DeepseekOCR2ForCausalLM):
    """Upstream's model; its input processor, the batching of its vision encoder and SAM's
    attention kernel (``sam_attention``) differ."""


def _prepare_model(model: Any) -> None:
    apply_memory_cap()  # built in the engine core's worker: device set, weights not yet loaded
    sam = getattr(model, "sam_model", None)
    if sam is not None:
        n = patch_sam_attention(sam)
        _log.info("SAM relative-position attention without a materialised bias: %d layer(s)", n)
        n = patch_sam_blocks(sam)
        _log.info("SAM blocks with Triton-built widened heads (RUNNER_SAM_FUSED=%s): %d", fused_mode(), n)
    qwen2 = getattr(model, "qwen2_model", None)  # OCR-2's encoder
    if qwen2 is not None:
        n = patch_encoder_mask(qwen2)
        _log.info("OCR-2 encoder mask built with tensor operations: %d module(s)", n)


ARCHITECTURES = {
    "DeepseekOCRForCausalLM": FastDeepseekOCRForCausalLM,
    "DeepseekOCR2ForCausalLM": FastDeepseekOCR2ForCausalLM,
}


_registered = False


def register() -> None:
    """Register the fast-processor model classes under upstream's architecture names (once per
    process: both ``VllmEngine.start`` and vLLM's plugin loader call it in the CLI's process)."""
    global _registered
    if _registered:
        return
    for arch, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, cls)
    _registered = True


# The views can be read-only (zero-copy out of shared memory or Ray's object store); they are never
# written, so torch's warning about it is noise (set once here: ``catch_warnings`` is not thread-safe).
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning, module=__name__
)


def prepared_to_mm_data(prepared: Any) -> dict[str, torch.Tensor]:
    """``PreparedImage`` (the views' uint8 pixels) -> the tensors dict the parser accepts (no
    copy). They stay uint8 up to the model, which normalises them on the GPU
    (``batched_encoder.pixels_to_model_dtype``)."""
    g = torch.from_numpy(prepared.global_view).unsqueeze(0)
    c = torch.from_numpy(prepared.crops)
    s = torch.tensor([list(prepared.tiles)], dtype=torch.long)
    return {"pixel_values": g, "images_crop": c, "images_spatial_crop": s}
