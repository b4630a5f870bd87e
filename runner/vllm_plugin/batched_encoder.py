"""The vision encoder over all pages of an engine step at once (engine stage, vLLM plugin).

Upstream's ``_pixel_values_to_embedding`` (vLLM 0.26, ``deepseek_ocr.py`` / ``deepseek_ocr2.py``)
loops over the pages of a step: for each page, SAM + CLIP (OCR-2: SAM + the Qwen2 encoder) on the
one global view, then again on that page's crops, plus a ``.item()`` host sync per page. A
prefill step holds up to ~18 Gundam pages (16k tokens), so ~36 encoder calls of batch 1-6 and
their ~10^4 kernel launches. Measured on the H100 (GPU session 2, run logs): prefill steps took
~450 ms each, ~25 ms of GPU time per page against ~45 ms for its 1000 decode steps.

Here the global views of all pages go through the encoder together, then all crops together (in
chunks of ``RUNNER_ENCODER_BATCH`` images, default 32, to bound activation memory), with two host
syncs for the whole step, both before the encoder is queued. A step never encodes more pages at
once than vLLM's memory-profiling call did (its first call), so the activation peak stays inside
the budget vLLM measured (GPU session 3: a low-VRAM step held 7 Base pages against 2 profiled, and
the device peaked ~2.4 GiB over the budget), and no encoder call holds more pixels than the
profiling step's largest (``_views_cap``; GPU session 8: 23 Large pages in one call ran out of
memory). The per-page assembly (tile grid,
newline column, view separator) is upstream's. Same math per image; only the batching differs
(so bf16 results may differ from the per-page loop in the last bits, as between any two batch
sizes). ``RUNNER_BATCHED_ENCODER=0`` keeps upstream's loop.

Pure torch: imported by ``fast_processor`` (the vLLM side) and tested on CPU against a copy of
upstream's loop, on the GPU machine against upstream's own methods.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

# Under "vllm." so that it prints through vLLM's own log handler in the engine-core process.
log = logging.getLogger("vllm.deepseek_ocr_pipeline")
_announced = False
_announced_mixed = False


def enabled() -> bool:
    return os.environ.get("RUNNER_BATCHED_ENCODER", "1") != "0"


def _max_batch() -> int:
    return max(1, int(os.environ.get("RUNNER_ENCODER_BATCH", "32")))


def crops_per_image(spatial: torch.Tensor) -> torch.Tensor:
    """Crops each image has, from its (n, 2) tile grid: w*h when tiled, 0 for a 1x1 grid (no
    crops), as upstream's field layout and per-page loop count them."""
    tiled = (spatial[:, 0] > 1) | (spatial[:, 1] > 1)
    return torch.where(tiled, spatial.prod(dim=-1), 0)


def _per_item(value: Any, n: int, counts: list[int] | None = None) -> list[torch.Tensor]:
    """One tensor per image from a field vLLM batched: a list (shapes differed) stays as it is; a
    tensor is split along dim 0, by ``counts`` rows per image for the flat crops field."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if counts is None:
        return [value[i] for i in range(n)]
    return list(torch.split(value, counts))


def describe_batch(kwargs: dict[str, Any]) -> str:
    """ "23 x 1024² + 138 crops 640²"-style summary of an encoder batch (lists: one entry each)."""
    pv, crops = kwargs.get("pixel_values"), kwargs.get("images_crop")
    views = list(pv) if isinstance(pv, (list, tuple)) else [pv] if pv is not None else []
    sizes: dict[int, int] = {}
    for v in views:
        n = v.shape[0] if v.dim() == 4 else 1
        sizes[int(v.shape[-1])] = sizes.get(int(v.shape[-1]), 0) + n
    parts = [f"{n} x {s}²" for s, n in sorted(sizes.items())]
    crop_list = list(crops) if isinstance(crops, (list, tuple)) else [crops] if crops is not None else []
    crop_sizes: dict[int, int] = {}
    for c in crop_list:
        if c.shape[0]:
            crop_sizes[int(c.shape[-1])] = crop_sizes.get(int(c.shape[-1]), 0) + int(c.shape[0])
    parts += [f"{n} crops {s}²" for s, n in sorted(crop_sizes.items())]
    return " + ".join(parts) or "no images"


def _traced(fn: Any, kwargs: dict[str, Any]) -> Any:
    """Run one encoder call and log, in the engine core: what it encoded, what was allocated on
    entry, the highest allocation since the previous call (the rest of the previous step: LM
    forward, sampler) and during this one. For finding what the warm-up holds beyond vLLM's
    profile (GPU session 7: ~6 GiB over the 3.6 GiB it profiled)."""
    gib = 2**30
    since_last = torch.cuda.max_memory_allocated() / gib
    entry = torch.cuda.memory_allocated() / gib
    torch.cuda.reset_peak_memory_stats()
    out = fn(kwargs)
    peak = torch.cuda.max_memory_allocated() / gib
    log.info(
        "memory trace: encoder call %s: allocated %.2f GiB on entry, peak %.2f GiB in it (+%.2f), "
        "peak %.2f GiB between the previous call and this one; reserved %.2f GiB",
        describe_batch(kwargs),
        entry,
        peak,
        peak - entry,
        since_last,
        torch.cuda.memory_reserved() / gib,
    )
    torch.cuda.reset_peak_memory_stats()
    return out


PIXEL_FIELDS = ("pixel_values", "images_crop")
_LUT_CHUNK = 1 << 23  # elements per lookup: bounds the int64 index temporary to 64 MB
_luts: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def pixels_to_model_dtype(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The views as the model takes them. Our requests carry uint8 pixels (``preprocess``: half
    the bytes of bfloat16 through vLLM's serialisation, pinned-memory batching and host-to-device
    copy); here, on the GPU, each byte becomes upstream's ``(x / 255 - 0.5) / 0.5`` in float32
    cast to the model's dtype, by table lookup: the very values vLLM's processor + its cast give.
    Float tensors (vLLM's own profiling inputs, made by upstream's processor) pass unchanged;
    lists (a batch whose shapes differ) are converted per tensor."""
    out = dict(kwargs)
    for key in PIXEL_FIELDS:
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor):
            out[key] = _normalise(v, dtype)
        elif isinstance(v, (list, tuple)):
            out[key] = [_normalise(t, dtype) if isinstance(t, torch.Tensor) else t for t in v]
    return out


def _normalise(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != torch.uint8:
        return t
    key = (t.device, dtype)
    lut = _luts.get(key)
    if lut is None:  # once per device and dtype: a copy to the GPU from pageable memory waits
        from runner.vllm_plugin.preprocess import NORM_LUT

        lut = _luts[key] = torch.from_numpy(NORM_LUT).to(t.device).to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), _LUT_CHUNK):
        dst[i : i + _LUT_CHUNK] = lut[src[i : i + _LUT_CHUNK].long()]
    return out


def uniform_groups(kwargs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Split one encoder batch into runs of consecutive images whose tensors stack, or None when
    it already stacks (the normal case).

    vLLM batches a step's images by stacking each field; when the shapes differ it hands the model
    a list instead, and upstream's ``_parse_and_validate_image_input`` fails on it (``torch.sum``
    of a list) and the engine core dies. That happens whenever one step encodes a Gundam page
    (1024² global view, 640² crops) beside a Large-mode page (1280², no crops): the engine's
    warm-up mixes them (GPU session 7: an engine died in warm-up on exactly this); in a run the
    pipeline's Large pass follows the main pass, but nothing else keeps the sizes apart. Order is
    kept, so the outputs still line up with vLLM's items."""
    pv, crops, spatial = (
        kwargs.get("pixel_values"),
        kwargs.get("images_crop"),
        kwargs.get("images_spatial_crop"),
    )
    if (
        pv is None
        or spatial is None
        or not (isinstance(pv, (list, tuple)) or isinstance(crops, (list, tuple)))
    ):
        return None
    n = len(pv)
    spatial_items = _per_item(spatial, n)
    counts = crops_per_image(torch.stack(spatial_items)).tolist()
    pv_items = _per_item(pv, n)
    crop_items = _per_item(crops, n, counts) if crops is not None else None
    rest = {
        k: v for k, v in kwargs.items() if k not in ("pixel_values", "images_crop", "images_spatial_crop")
    }

    def key(i: int) -> tuple[Any, ...]:
        c = crop_items[i].shape[1:] if crop_items is not None else None
        return (pv_items[i].shape, pv_items[i].dtype, c)

    groups: list[dict[str, Any]] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or key(i) != key(start):
            g = dict(rest)
            g["pixel_values"] = torch.stack(pv_items[start:i])
            g["images_spatial_crop"] = torch.stack(spatial_items[start:i])
            if crop_items is not None:
                g["images_crop"] = torch.cat(crop_items[start:i])
            groups.append(g)
            start = i
    return groups


VISION_MODULES = ("sam_model", "vision_model", "qwen2_model", "projector")


def _vllm_parameter_class() -> type | None:
    try:
        from vllm.model_executor.parameter import BasevLLMParameter
    except ImportError:
        return None
    return BasevLLMParameter  # type: ignore[no-any-return]


def plain_vision_parameters(model: Any, base: type | None = None) -> int:
    """Swap the vision tower's vLLM parameters (``BasevLLMParameter``: CLIP-L's / the projector's
    parallel linears) for plain ``torch.nn.Parameter`` objects over the same storage. vLLM's class
    overrides ``__torch_function__`` in Python, so every op that touches such a weight (each
    linear, and each ``.shape``/``.dtype`` read) detours through the interpreter; the LLM runs
    compiled, but the vision encoder runs eagerly in the engine core's step, where that detour was
    the largest single self-time entry: 10-13% of the engine core's busy host time in the first
    25 s of a run (GPU session 13, ``RUNNER_STACK_SAMPLE_CORE``). Called once weights are loaded
    (the loaders need the vLLM classes' ``weight_loader``); values are untouched.
    ``RUNNER_PLAIN_VISION_PARAMS=0`` keeps vLLM's parameters. Returns how many were swapped."""
    if os.environ.get("RUNNER_PLAIN_VISION_PARAMS", "1") == "0":
        return 0
    base = base or _vllm_parameter_class()
    if base is None:
        return 0
    n = 0
    for attr in VISION_MODULES:
        root = getattr(model, attr, None)
        if not isinstance(root, torch.nn.Module):
            continue
        for mod in root.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and isinstance(p, base):
                    mod._parameters[name] = torch.nn.Parameter(p.data, requires_grad=p.requires_grad)
                    n += 1
    return n


class _BatchedEncoderMixin:
    """Shared driver; model-specific: ``_encode_views``, ``_finish_global``, ``_finish_local``."""

    view_seperator: torch.Tensor  # upstream's spelling

    def embed_multimodal(self, **kwargs: Any) -> Any:
        """Upstream's, on the views normalised here (``pixels_to_model_dtype``: our requests carry
        uint8 pixels), once per run of images whose tensors stack (``uniform_groups``); with
        ``RUNNER_MEMORY_TRACE=1`` each call's memory is logged (``_traced``)."""
        if not getattr(self, "_runner_params_plain", False):  # the first call: weights are loaded
            self._runner_params_plain = True
            n = plain_vision_parameters(self)
            if n:
                log.info("vision tower: %d vLLM parameter(s) now plain torch parameters (same storage)", n)
        kwargs = pixels_to_model_dtype(kwargs, self.view_seperator.dtype)
        if os.environ.get("RUNNER_MEMORY_TRACE") == "1" and torch.cuda.is_available():
            return _traced(self._embed_groups, kwargs)
        return self._embed_groups(kwargs)

    def _embed_groups(self, kwargs: dict[str, Any]) -> Any:
        groups = uniform_groups(kwargs)
        if groups is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        global _announced_mixed
        if not _announced_mixed:
            _announced_mixed = True
            log.info("an encoder batch mixed view sizes: encoded in %d runs that stack", len(groups))
        out: list[torch.Tensor] = []
        for g in groups:
            part = super().embed_multimodal(**g)  # type: ignore[misc]
            if part is None:  # upstream's answer for an all-zero batch: no embeddings
                return None
            out.extend(part)
        return out

    def _encode_views(self, x: torch.Tensor) -> torch.Tensor:  # (n, 3, s, s) -> (n, hw, dim)
        raise NotImplementedError

    def _finish_global(self, features: torch.Tensor) -> torch.Tensor:  # (1, hw, dim) -> (t, dim)
        raise NotImplementedError

    def _finish_local(self, features: torch.Tensor, crop_shape: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_chunked(self, x: torch.Tensor) -> torch.Tensor:
        b = self._views_cap(x)
        parts = [self._encode_views(x[i : i + b]) for i in range(0, x.shape[0], b)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _views_cap(self, x: torch.Tensor) -> int:
        """Views of this size per ``_encode_views`` call: at most ``RUNNER_ENCODER_BATCH``, and no
        more pixels than the largest call of the profiling step encoded (its activation peak is
        what vLLM budgeted; ``_pages_cap`` records it). Views larger than the profiled ones get
        proportionally fewer pixels, as their attention costs more per pixel. GPU session 8
        (H100): the warm-up's 1280² Large pages, 23 per call (the page cap) = 1.6× the profiled
        pixels, took +6.6 GiB against +3.3 profiled and ran the engine out of memory."""
        total, profiled_side = self._runner_pixel_budget
        side = max(int(x.shape[-2]), int(x.shape[-1]))
        pixels = int(x.shape[-2]) * int(x.shape[-1])
        return max(1, min(_max_batch(), int(total * min(1.0, profiled_side / side)) // pixels))

    def _pixel_values_to_embedding(
        self,
        pixel_values: torch.Tensor,
        images_crop: torch.Tensor,
        images_spatial_crop: torch.Tensor,
    ) -> list[torch.Tensor]:
        if not enabled():
            return super()._pixel_values_to_embedding(  # type: ignore[misc]
                pixel_values, images_crop, images_spatial_crop
            )
        n = images_spatial_crop.size(0)
        if n == 0:
            return []
        # The tile grids on the host once: upstream reads them with .item() per page, a host sync
        # each time, and its grid assembly (_finish_local) does so on what it is given.
        spatial = images_spatial_crop.cpu()
        counts = crops_per_image(spatial).tolist()
        cap = self._pages_cap(pixel_values, images_crop, counts)
        out: list[torch.Tensor] = []
        first_crop = 0
        for a in range(0, n, cap):
            b = min(n, a + cap)
            k = sum(counts[a:b])
            out += self._encode_pages(
                pixel_values[a:b], images_crop[first_crop : first_crop + k], spatial[a:b], counts[a:b]
            )
            first_crop += k
        return out

    def _pages_cap(self, pixel_values: torch.Tensor, images_crop: torch.Tensor, counts: list[int]) -> int:
        """Pages per encoder call. The first call is vLLM's memory profiling run ("profiled with K
        image items of the maximum feature size"): its K pages at once are what the activation
        budget covers. Later steps can hold more, smaller pages (low-VRAM: Base pages of 273
        tokens, 7 in a 2k-token step, against 2 profiled): they are encoded K pages at a time.
        The first call also sets ``_views_cap``'s budget: the pixels of its largest
        ``_encode_views`` call (its K global views, or its crops, ``RUNNER_ENCODER_BATCH`` at a
        time) and its largest view side."""
        cap = getattr(self, "_runner_pages_cap", None)
        if cap is None:
            n, k, b = len(counts), sum(counts), _max_batch()
            cap = self._runner_pages_cap = max(1, n)
            total = min(b, n) * int(pixel_values.shape[-2]) * int(pixel_values.shape[-1])
            side = max(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
            if k:
                total = max(total, min(b, k) * int(images_crop.shape[-2]) * int(images_crop.shape[-1]))
                side = max(side, int(images_crop.shape[-2]), int(images_crop.shape[-1]))
            self._runner_pixel_budget = (total, side)
            global _announced
            if not _announced:  # proof, in the engine core's log, that this code is the one running
                _announced = True
                log.info(
                    "batched vision encoder active (%s): %d page(s) in the first (profiling) call; "
                    "at most that many pages, and %.1f Mpixel of views (views over %d px: "
                    "proportionally fewer), per encoder call",
                    type(self).__name__,
                    n,
                    total / 1e6,
                    side,
                )
        return int(cap)

    def _encode_pages(
        self,
        pixel_values: torch.Tensor,
        images_crop: torch.Tensor,
        spatial: torch.Tensor,
        counts: list[int],
    ) -> list[torch.Tensor]:
        """Global views of these pages in one encoder call, their crops in another."""
        n = len(counts)
        crops = images_crop.split(counts)
        # Upstream drops a page's local features when its crops sum to zero (no crops): one sync.
        has_local = [s != 0 for s in torch.stack([c.sum() for c in crops]).tolist()]
        glob = self._encode_chunked(pixel_values[:n])
        if not any(has_local):
            local = None
        elif all(has_local[j] == (counts[j] > 0) for j in range(n)):
            local = self._encode_chunked(images_crop[: sum(counts)])  # the usual case: no copy
        else:
            local = self._encode_chunked(torch.cat([crops[j] for j in range(n) if has_local[j]]))
        out: list[torch.Tensor] = []
        pos = 0
        sep = self.view_seperator[None, :]
        for j in range(n):
            g = self._finish_global(glob[j : j + 1])
            if has_local[j] and local is not None:
                c = counts[j]
                loc = self._finish_local(local[pos : pos + c], spatial[j])
                pos += c
                out.append(torch.cat([loc, g, sep], dim=0))
            else:
                out.append(torch.cat([g, sep], dim=0))
        return out


class BatchedOCRMixin(_BatchedEncoderMixin):
    """DeepSeek-OCR: SAM + CLIP, projector, newline column per row, tile grid for crops."""

    sam_model: Any
    vision_model: Any
    projector: Any
    image_newline: torch.Tensor

    def _encode_views(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.sam_model(x)
        f2 = self.vision_model(x, f1)
        return self.projector(torch.cat((f2[:, 1:], f1.flatten(2).permute(0, 2, 1)), dim=-1))

    def _finish_global(self, features: torch.Tensor) -> torch.Tensor:
        _, hw, dim = features.shape
        side = int(hw**0.5)
        features = features.view(side, side, dim)
        newline = self.image_newline[None, None, :].expand(side, 1, dim)
        return torch.cat([features, newline], dim=1).view(-1, dim)

    def _finish_local(self, features: torch.Tensor, crop_shape: torch.Tensor) -> torch.Tensor:
        return self._assemble_patch_grid(features, crop_shape)  # type: ignore[attr-defined,no-any-return]


class BatchedOCR2Mixin(_BatchedEncoderMixin):
    """DeepSeek-OCR-2: SAM + the Qwen2 encoder, projector; views are flattened as they are."""

    sam_model: Any
    qwen2_model: Any
    projector: Any

    def _encode_views(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.qwen2_model(self.sam_model(x)))

    def _finish_global(self, features: torch.Tensor) -> torch.Tensor:
        return features.reshape(-1, features.shape[-1])

    def _finish_local(self, features: torch.Tensor, crop_shape: torch.Tensor) -> torch.Tensor:
        return features.reshape(-1, features.shape[-1])
