"""DeepSeek-OCR image preprocessing for the render workers (render stage, for the vLLM engine).

vLLM's own ``DeepseekOCRProcessor`` (``vllm/transformers_utils/processors/deepseek_ocr.py``) runs
serially in the process that feeds the engine: ~120-235 ms per A4 page, mostly PIL resizes and
float32 tensor work, which capped the seeds at ~3-6 pages/s (issue 7). This module computes the
same model inputs in the render worker processes, in parallel, so the feeding thread only wraps
ready buffers:

- the same PIL operations in the same order (``ImageOps.pad`` global view, ``resize`` + ``crop``
  tiles, the same tile-grid choice), so the uint8 pixels are identical;
- the views travel as those uint8 pixels (CHW): half the bytes of bfloat16 through shared
  memory, vLLM's request serialisation, its pinned-memory batching and the copy to the GPU. The
  model side (``batched_encoder.pixels_to_model_dtype``) maps them to
  ``(x / 255 - 0.5) / 0.5`` in float32 followed by the cast that vLLM applies to processor
  outputs (bfloat16), as one 256-entry table (``NORM_LUT``; exact: the value depends only on the
  byte). ``as_bf16_tensor`` does the same on the CPU (the Transformers engine).

This module imports only numpy and PIL (no torch, no vLLM): it runs inside render workers.
Equality with vLLM's processor is checked on the GPU machine
and in ``tests/test_vllm_engine.py`` where vLLM imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_CROPS = 2
MAX_CROPS = 6
PATCH_SIZE = 16
DOWNSAMPLE = 4
PAD_COLOR = (127, 127, 127)  # tuple(int(0.5 * 255) for _ in range(3)), as upstream


@dataclass(frozen=True)
class ViewSpec:
    """Resolution parameters: global view size, tile size, tiling on/off, token strategy."""

    base_size: int
    image_size: int
    crop_mode: bool
    strategy: str  # "v1" (DeepSeek-OCR: newline tokens) | "v2" (DeepSeek-OCR-2)

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "base_size": self.base_size,
            "image_size": self.image_size,
            "crop_mode": self.crop_mode,
            "strategy": self.strategy,
        }


@dataclass(frozen=True)
class PreparedImage:
    """Model inputs for one page image, as the views' uint8 pixels (CHW), before normalisation."""

    global_view: np.ndarray  # (3, base, base) uint8
    crops: np.ndarray  # (k, 3, image_size, image_size) uint8; k = 0 when not tiled
    tiles: tuple[int, int]  # (width tiles, height tiles); (1, 1) when not tiled
    spec: ViewSpec
    source_size: tuple[int, int]  # (width, height) of the page image

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.spec, self.tiles)


def view_spec(adapter: Any, resolution: str | None) -> ViewSpec:
    """The ``ViewSpec`` of a model adapter's resolution mode (``runner.adapters.ModelAdapter``)."""
    r = adapter.resolution(resolution)
    return ViewSpec(r.base_size, r.image_size, r.crop_mode, "v2" if adapter.key == "deepseek-ocr-2" else "v1")


def as_bf16_tensor(pixels: np.ndarray) -> Any:
    """A view's uint8 pixels as the normalised torch bfloat16 tensor the model takes (CPU, one
    table lookup; torch is imported here, not at module level)."""
    import torch

    return torch.from_numpy(BF16_LUT[pixels]).view(torch.bfloat16)


def _norm_lut() -> np.ndarray:
    """Upstream's normalisation of each byte value, in float32 as its processor computes it."""
    u = np.arange(256, dtype=np.float32)
    return ((u / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5)


def _bf16_bits(f: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (torch's cast)."""
    bits = f.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16)


NORM_LUT = _norm_lut()  # float32, indexed by byte value
BF16_LUT = _bf16_bits(NORM_LUT)  # the same as bfloat16 bit patterns


def calculate_aspect_ratios(min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> list[tuple[int, int]]:
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def tile_grid(width: int, height: int, spec: ViewSpec) -> tuple[int, int]:
    """(width tiles, height tiles) upstream picks for an image of this size."""
    if not spec.crop_mode or (width <= spec.image_size and height <= spec.image_size):
        return (1, 1)
    return find_closest_aspect_ratio(
        width / height, calculate_aspect_ratios(), width, height, spec.image_size
    )


def num_image_tokens(spec: ViewSpec, tiles: tuple[int, int]) -> int:
    """Image placeholder tokens for one image (upstream's ``tokenize_with_images`` count)."""
    q = math.ceil((spec.image_size // PATCH_SIZE) / DOWNSAMPLE)
    qb = math.ceil((spec.base_size // PATCH_SIZE) / DOWNSAMPLE)
    n = qb * (qb + 1) if spec.strategy == "v1" else qb * qb
    n += 1
    wt, ht = tiles
    if wt > 1 or ht > 1:
        per_row = q * wt + 1 if spec.strategy == "v1" else q * wt
        n += per_row * (q * ht)
    return n


def _to_chw(img: Any) -> np.ndarray:
    """(3, H, W) uint8 pixels of an RGB image."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def _tiles(resized: Any, tiles: tuple[int, int], size: int) -> np.ndarray:
    """(wt*ht, 3, size, size) uint8 tiles of ``resized`` (an RGB image of exactly wt*size x
    ht*size), row by row as upstream crops them: one reshape of the pixels instead of a PIL crop
    and a conversion per tile."""
    wt, ht = tiles
    arr = np.asarray(resized, dtype=np.uint8)  # (ht*size, wt*size, 3)
    grid = arr.reshape(ht, size, wt, size, 3).transpose(0, 2, 4, 1, 3)  # (ht, wt, 3, y, x)
    return np.ascontiguousarray(grid).reshape(wt * ht, 3, size, size)


def prepare_image(image: Any, spec: ViewSpec) -> PreparedImage:
    """Compute the model inputs for one RGB PIL image, exactly as vLLM's processor would."""
    from PIL import ImageOps

    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    tiles = tile_grid(width, height, spec)
    if spec.crop_mode and tiles != (1, 1):
        tw, th = spec.image_size * tiles[0], spec.image_size * tiles[1]
        c = _tiles(image.resize((tw, th)), tiles, spec.image_size)
    else:
        c = np.zeros((0, 3, spec.image_size, spec.image_size), dtype=np.uint8)
    view_src = image if spec.crop_mode else image.resize((spec.image_size, spec.image_size))
    global_view = ImageOps.pad(view_src, (spec.base_size, spec.base_size), color=PAD_COLOR)
    g = _to_chw(global_view)
    return PreparedImage(global_view=g, crops=c, tiles=tiles, spec=spec, source_size=(width, height))


def worker_hook(image: Any, **spec: Any) -> PreparedImage:
    """Render-worker hook (``VllmEngine.worker_hook``): ``spec`` is ``ViewSpec.as_kwargs()``."""
    return prepare_image(image, ViewSpec(**spec))
