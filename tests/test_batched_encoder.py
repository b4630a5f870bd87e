"""The batched vision encoder (runner/vllm_plugin/batched_encoder.py) against upstream's per-page
loop: on CPU against a copy of vLLM 0.26's loop with toy encoders; on the GPU machine against
upstream's own methods (same toys)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from runner.vllm_plugin.batched_encoder import BatchedOCR2Mixin, BatchedOCRMixin

HAS_VLLM = importlib.util.find_spec("vllm") is not None
DIM = 8


class _Sam(nn.Module):  # (n, 3, s, s) -> (n, 4, s/16, s/16)
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 16, stride=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Clip(nn.Module):  # (x, f1) -> (n, 1 + hw, 6): a class token, then one row per SAM cell
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.cls = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        rows = (
            self.lin(f1.flatten(2).permute(0, 2, 1)) + x.mean(dim=(1, 2, 3))[:, None, None] * 0.01
        )  # per image
        return torch.cat([self.cls.expand(rows.shape[0], 1, 6), rows], dim=1)


class _Qwen(nn.Module):  # OCR-2's encoder: (n, 4, h, w) -> (n, hw, 5)
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, f1: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(f1.flatten(2).permute(0, 2, 1)))


class ToyOCR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sam_model, self.vision_model = _Sam(), _Clip()
        self.projector = nn.Linear(4 + 6, DIM)
        self.image_newline = nn.Parameter(torch.randn(DIM))
        self.view_seperator = nn.Parameter(torch.randn(DIM))

    # -- copied from vLLM 0.26 deepseek_ocr.py (the per-page loop) ---------------------------------
    def _encode_global_features(self, image_tensor):
        global_features_1 = self.sam_model(image_tensor)
        global_features_2 = self.vision_model(image_tensor, global_features_1)
        features = torch.cat(
            (global_features_2[:, 1:], global_features_1.flatten(2).permute(0, 2, 1)), dim=-1
        )
        features = self.projector(features)
        _, hw, dim = features.shape
        side = int(hw**0.5)
        features = features.view(side, side, dim)
        newline = self.image_newline[None, None, :].expand(side, 1, dim)
        features = torch.cat([features, newline], dim=1)
        return features.view(-1, dim)

    def _encode_local_features(self, patches, crop_shape):
        if torch.sum(patches).item() == 0:
            return None
        local_features_1 = self.sam_model(patches)
        local_features_2 = self.vision_model(patches, local_features_1)
        features = torch.cat((local_features_2[:, 1:], local_features_1.flatten(2).permute(0, 2, 1)), dim=-1)
        features = self.projector(features)
        return self._assemble_patch_grid(features, crop_shape)

    def _assemble_patch_grid(self, features, crop_shape):
        _, hw, dim = features.shape
        patch_side = int(hw**0.5)
        width_tiles = int(crop_shape[0].item())
        height_tiles = int(crop_shape[1].item())
        features = (
            features.view(height_tiles, width_tiles, patch_side, patch_side, dim)
            .permute(0, 2, 1, 3, 4)
            .reshape(height_tiles * patch_side, width_tiles * patch_side, dim)
        )
        newline = self.image_newline[None, None, :].expand(height_tiles * patch_side, 1, dim)
        features = torch.cat([features, newline], dim=1)
        return features.view(-1, dim)

    def _pixel_values_to_embedding(self, pixel_values, images_crop, images_spatial_crop):
        images_in_this_batch = []
        is_tiled = (images_spatial_crop[:, 0] > 1) | (images_spatial_crop[:, 1] > 1)
        patches_per_image = torch.where(is_tiled, images_spatial_crop.prod(dim=-1), 0)
        images_crop = images_crop.split(patches_per_image.tolist())
        for jdx in range(images_spatial_crop.size(0)):
            patches = images_crop[jdx]
            image_ori = pixel_values[[jdx]]
            crop_shape = images_spatial_crop[jdx]
            global_features = self._encode_global_features(image_ori)
            local_features = self._encode_local_features(patches, crop_shape)
            if local_features is not None:
                combined = torch.cat([local_features, global_features, self.view_seperator[None, :]], dim=0)
            else:
                combined = torch.cat([global_features, self.view_seperator[None, :]], dim=0)
            images_in_this_batch.append(combined)
        return images_in_this_batch


class ToyOCR2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sam_model, self.qwen2_model = _Sam(), _Qwen()
        self.projector = nn.Linear(5, DIM)
        self.view_seperator = nn.Parameter(torch.randn(DIM))

    # -- copied from vLLM 0.26 deepseek_ocr2.py --------------------------------------------------
    def _encode_global_features(self, image_tensor):
        features = self.projector(self.qwen2_model(self.sam_model(image_tensor)))
        dim = features.shape[-1]
        return features.view(-1, dim)

    def _encode_local_features(self, patches):
        if torch.sum(patches).item() == 0:
            return None
        features = self.projector(self.qwen2_model(self.sam_model(patches)))
        _, _, dim = features.shape
        return features.view(-1, dim)

    def _pixel_values_to_embedding(self, pixel_values, images_crop, images_spatial_crop):
        images_in_this_batch = []
        is_tiled = (images_spatial_crop[:, 0] > 1) | (images_spatial_crop[:, 1] > 1)
        patches_per_image = torch.where(is_tiled, images_spatial_crop.prod(dim=-1), 0)
        images_crop = images_crop.split(patches_per_image.tolist())
        for jdx in range(images_spatial_crop.size(0)):
            patches = images_crop[jdx]
            image_ori = pixel_values[[jdx]]
            global_features = self._encode_global_features(image_ori)
            local_features = self._encode_local_features(patches)
            if local_features is not None:
                combined = torch.cat([local_features, global_features, self.view_seperator[None, :]], dim=0)
            else:
                combined = torch.cat([global_features, self.view_seperator[None, :]], dim=0)
            images_in_this_batch.append(combined)
        return images_in_this_batch


def _upstream_classes() -> tuple[type, type]:
    """Toys whose per-page loop is upstream's own code when vLLM is importable."""
    if not HAS_VLLM:
        return ToyOCR, ToyOCR2
    from vllm.model_executor.models.deepseek_ocr import DeepseekOCRForCausalLM as U1
    from vllm.model_executor.models.deepseek_ocr2 import DeepseekOCR2ForCausalLM as U2

    names1 = (
        "_encode_global_features",
        "_encode_local_features",
        "_assemble_patch_grid",
        "_pixel_values_to_embedding",
    )
    names2 = ("_encode_global_features", "_encode_local_features", "_pixel_values_to_embedding")
    up1 = type("Up1", (ToyOCR,), {n: getattr(U1, n) for n in names1})
    up2 = type("Up2", (ToyOCR2,), {n: getattr(U2, n) for n in names2})
    return up1, up2


class Batched1(BatchedOCRMixin, ToyOCR):
    pass


class Batched2(BatchedOCR2Mixin, ToyOCR2):
    pass


def _inputs(tiles: list[tuple[int, int]], base: int = 64, crop: int = 32):
    g = torch.randn(len(tiles), 3, base, base)
    n_crops = sum(w * h for w, h in tiles if w > 1 or h > 1)
    c = torch.randn(n_crops, 3, crop, crop)
    s = torch.tensor(tiles, dtype=torch.long)
    return g, c, s


@pytest.mark.parametrize("max_batch", ["32", "2"])
@pytest.mark.parametrize("model", ["ocr", "ocr2"])
def test_batched_equals_the_per_page_loop(
    model: str, max_batch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_ENCODER_BATCH", max_batch)
    torch.manual_seed(0)
    up1, up2 = _upstream_classes()
    ref_cls, new_cls = (up1, Batched1) if model == "ocr" else (up2, Batched2)
    ref = ref_cls()
    new = new_cls()
    new.load_state_dict(ref.state_dict())
    # tiled pages of several grids, untiled pages (no crops) in between
    g, c, s = _inputs([(2, 3), (1, 1), (3, 2), (2, 2), (1, 1), (2, 1)])
    with torch.no_grad():
        want = ref._pixel_values_to_embedding(g, c, s)
        got = new._pixel_values_to_embedding(g, c, s)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_switch_off_runs_upstreams_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_BATCHED_ENCODER", "0")
    calls = []
    new = Batched1()
    orig = ToyOCR._encode_global_features

    def spy(self, x):
        calls.append(x.shape[0])
        return orig(self, x)

    monkeypatch.setattr(ToyOCR, "_encode_global_features", spy)
    g, c, s = _inputs([(2, 2), (1, 1), (2, 1)])
    with torch.no_grad():
        new._pixel_values_to_embedding(g, c, s)
    assert calls == [1, 1, 1]  # one page at a time, as upstream


def test_one_encoder_call_per_view_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    new = Batched1()
    sizes: list[int] = []
    orig = new.sam_model.forward
    monkeypatch.setattr(new.sam_model, "forward", lambda x: sizes.append(x.shape[0]) or orig(x))
    g, c, s = _inputs([(2, 3), (1, 1), (3, 2), (2, 2)])
    with torch.no_grad():
        new._pixel_values_to_embedding(g, c, s)
    assert sizes == [4, 16]  # all global views, then all 6+6+4 crops


def test_a_tiled_page_whose_crops_sum_to_zero_loses_its_local_features_as_upstream() -> None:
    torch.manual_seed(1)
    up1, _ = _upstream_classes()
    ref, new = up1(), Batched1()
    new.load_state_dict(ref.state_dict())
    g, c, s = _inputs([(2, 2), (2, 1), (1, 1)])
    c[4:6] = 0.0  # the second page's two crops: upstream's "no local features" test is sum == 0
    with torch.no_grad():
        want = ref._pixel_values_to_embedding(g, c, s)
        got = new._pixel_values_to_embedding(g, c, s)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert got[1].shape[0] < want[0].shape[0]  # global view + separator only
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["ocr", "ocr2"])
def test_later_steps_never_encode_more_pages_at_once_than_the_profiling_call(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM profiles activation memory with its first encoder call (K pages of the largest size);
    a later step of more, smaller pages (low-VRAM: 7 Base pages against 2 profiled) is encoded at
    most K pages at a time, with the same result as the per-page loop."""
    torch.manual_seed(2)
    up1, up2 = _upstream_classes()
    ref_cls, new_cls = (up1, Batched1) if model == "ocr" else (up2, Batched2)
    ref, new = ref_cls(), new_cls()
    new.load_state_dict(ref.state_dict())
    sizes: list[int] = []
    orig = new.sam_model.forward
    monkeypatch.setattr(new.sam_model, "forward", lambda x: sizes.append(x.shape[0]) or orig(x))
    with torch.no_grad():
        new._pixel_values_to_embedding(*_inputs([(2, 2), (1, 1)]))  # the profiling call: 2 pages
        sizes.clear()
        g, c, s = _inputs([(2, 3), (1, 1), (3, 2), (2, 2), (1, 1), (2, 1), (1, 1)])
        want = ref._pixel_values_to_embedding(g, c, s)
        got = new._pixel_values_to_embedding(g, c, s)
    # 7 pages in groups of 2, 2, 2, 1: globals and crops of each group (6+0, 6+4, 0+2, 0); no
    # call over the profiling call's largest pixels (2 x 64² = 8 crops of 32²): 10 crops -> 8 + 2
    assert sizes == [2, 6, 2, 8, 2, 2, 2, 1]
    assert len(got) == len(want) == 7
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- mixed shapes in one encoder batch (a Gundam page beside a Large-mode retry) ---------------


class _RecordingUpstream:
    """Stands in for upstream's ``embed_multimodal``: it accepts only stacked tensors (upstream
    calls ``torch.sum`` on them) and returns one embedding per image, derived from its tensors."""

    view_seperator = torch.zeros(4)  # upstream's parameter (its dtype is the model's)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed_multimodal(self, **kw: object) -> list[torch.Tensor]:
        pv, crops, spatial = kw["pixel_values"], kw["images_crop"], kw["images_spatial_crop"]
        assert (
            isinstance(pv, torch.Tensor)
            and isinstance(crops, torch.Tensor)
            and isinstance(spatial, torch.Tensor)
        )
        assert kw.get("extra") == "kept"
        self.calls.append(pv.shape[0])
        out, first = [], 0
        for i in range(pv.shape[0]):
            w, h = (int(v) for v in spatial[i])
            k = w * h if (w > 1 or h > 1) else 0
            c = crops[first : first + k]
            first += k
            out.append(torch.tensor([pv[i].sum().item(), pv.shape[-1], k, c.sum().item() if k else 0.0]))
        assert first == crops.shape[0]
        return out


class _MixedModel(BatchedOCRMixin, _RecordingUpstream):
    pass


def _page(size: int, crop: int, grid: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = grid[0] * grid[1] if grid != (1, 1) else 0
    return torch.rand(3, size, size, generator=g), torch.rand(k, 3, crop, crop, generator=g)


def test_a_batch_of_mixed_view_sizes_is_encoded_in_runs_that_stack_in_order() -> None:
    # As vLLM hands them over when shapes differ: lists for pixel_values and the crops (one entry
    # per image), the tile grids stacked.
    layout = [
        (16, 8, (3, 2)),
        (20, 20, (1, 1)),
        (20, 20, (1, 1)),
        (16, 8, (1, 1)),
        (16, 8, (2, 2)),
        (20, 20, (1, 1)),
    ]
    pages = [_page(s, c, grid, i) for i, (s, c, grid) in enumerate(layout)]
    spatial = torch.tensor([list(grid) for _, _, grid in layout])
    model = _MixedModel()
    out = model.embed_multimodal(
        pixel_values=[p for p, _ in pages],
        images_crop=[c for _, c in pages],
        images_spatial_crop=spatial,
        extra="kept",
    )
    # runs: [16, 20, 20, 16+16 (the untiled 16 page has no crops of its own; crop shape 8 like its
    # neighbour), 20] -> 16 | 20 20 | 16 16 | 20
    assert model.calls == [1, 2, 2, 1]
    one_by_one = _RecordingUpstream()
    expected = [
        one_by_one.embed_multimodal(
            pixel_values=p[None], images_crop=c, images_spatial_crop=spatial[i : i + 1], extra="kept"
        )[0]
        for i, (p, c) in enumerate(pages)
    ]
    assert len(out) == len(expected)
    for a, b in zip(out, expected, strict=True):
        assert torch.equal(a, b)


def test_mixed_pixel_values_with_crops_already_concatenated_are_split_by_the_tile_grids() -> None:
    layout = [(16, 8, (3, 2)), (20, 8, (1, 1)), (16, 8, (2, 2))]
    pages = [_page(s, c, grid, 10 + i) for i, (s, c, grid) in enumerate(layout)]
    spatial = torch.tensor([list(grid) for _, _, grid in layout])
    crops = torch.cat([c for _, c in pages])  # vLLM concatenates the flat field when it can
    model = _MixedModel()
    out = model.embed_multimodal(
        pixel_values=[p for p, _ in pages], images_crop=crops, images_spatial_crop=spatial, extra="kept"
    )
    assert model.calls == [1, 1, 1]
    assert [int(o[2]) for o in out] == [6, 0, 4]
    assert [float(o[3]) for o in out] == pytest.approx(
        [float(pages[0][1].sum()), 0.0, float(pages[2][1].sum())]
    )


def test_a_batch_that_stacks_goes_to_upstream_untouched() -> None:
    pages = [_page(16, 8, (2, 2), i) for i in range(3)]
    model = _MixedModel()
    out = model.embed_multimodal(
        pixel_values=torch.stack([p for p, _ in pages]),
        images_crop=torch.cat([c for _, c in pages]),
        images_spatial_crop=torch.tensor([[2, 2]] * 3),
        extra="kept",
    )
    assert model.calls == [3] and len(out) == 3


def test_batch_description_names_view_sizes_and_crops() -> None:
    from runner.vllm_plugin.batched_encoder import describe_batch

    mixed = dict(
        pixel_values=[torch.zeros(3, 16, 16), torch.zeros(3, 20, 20), torch.zeros(3, 16, 16)],
        images_crop=[torch.zeros(6, 3, 8, 8), torch.zeros(0, 3, 20, 20), torch.zeros(4, 3, 8, 8)],
    )
    assert describe_batch(mixed) == "2 x 16² + 1 x 20² + 10 crops 8²"
    stacked = dict(pixel_values=torch.zeros(5, 3, 16, 16), images_crop=torch.zeros(0, 3, 8, 8))
    assert describe_batch(stacked) == "5 x 16²"
    assert describe_batch({}) == "no images"


def test_memory_trace_logs_each_encoder_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """RUNNER_MEMORY_TRACE=1: one line per encoder call with what it encoded and the allocator's
    numbers (stand-ins here: the real ones need CUDA)."""
    import logging

    state = {"alloc": 10 * 2**30, "peak": 12 * 2**30}
    monkeypatch.setenv("RUNNER_MEMORY_TRACE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 15 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["alloc"]))
    pages = [_page(16, 8, (2, 2), i) for i in range(2)]
    model = _MixedModel()
    with caplog.at_level(logging.INFO, logger="vllm.deepseek_ocr_pipeline"):
        out = model.embed_multimodal(
            pixel_values=torch.stack([p for p, _ in pages]),
            images_crop=torch.cat([c for _, c in pages]),
            images_spatial_crop=torch.tensor([[2, 2]] * 2),
            extra="kept",
        )
    assert len(out) == 2 and model.calls == [2]
    line = next(r.getMessage() for r in caplog.records if "memory trace" in r.getMessage())
    assert "2 x 16² + 8 crops 8²" in line
    assert "allocated 10.00 GiB on entry" in line and "12.00 GiB between the previous call" in line


@pytest.mark.parametrize("model", ["ocr", "ocr2"])
def test_larger_views_than_profiled_are_encoded_in_smaller_chunks(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPU session 8: the warm-up's Large pages (1280², no crops) went through the encoder as many
    at once as the profiling call's Gundam pages (1024² + crops), 1.6x its pixels, and ran the
    engine out of memory. Each encoder call now holds at most the profiling call's largest pixel
    count, scaled down by side for views larger than the profiled ones; same result as upstream."""
    torch.manual_seed(3)
    up1, up2 = _upstream_classes()
    ref_cls, new_cls = (up1, Batched1) if model == "ocr" else (up2, Batched2)
    ref, new = ref_cls(), new_cls()
    new.load_state_dict(ref.state_dict())
    sizes: list[tuple[int, int]] = []
    orig = new.sam_model.forward
    monkeypatch.setattr(
        new.sam_model, "forward", lambda x: sizes.append((x.shape[0], x.shape[-1])) or orig(x)
    )
    with torch.no_grad():
        # profiling call: 4 pages of 64² globals (4 * 4096 px, the largest call) + 8 crops of 32²
        new._pixel_values_to_embedding(*_inputs([(2, 1), (2, 1), (2, 1), (2, 1)]))
        assert sizes == [(4, 64), (8, 32)]
        sizes.clear()
        # 4 untiled pages of 80²: 4096 * 4 * (64 / 80) // 6400 = 2 views per call, not 4
        g, c, s = _inputs([(1, 1)] * 4, base=80)
        want = ref._pixel_values_to_embedding(g, c, s)
        got = new._pixel_values_to_embedding(g, c, s)
        assert sizes == [(2, 80), (2, 80)]
        sizes.clear()
        # smaller views still fill the profiled pixels: 4 pages, 2x2 grids -> 16 crops of 32², all
        # in one call (16 * 1024 = 16384 px <= 4 * 4096)
        new._pixel_values_to_embedding(*_inputs([(2, 2)] * 4))
        assert sizes == [(4, 64), (16, 32)]
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _SlowParam(nn.Parameter):
    """Stands in for vLLM's ``BasevLLMParameter``: a Parameter subclass with a Python
    ``__torch_function__`` (that is what made each op on it detour through the interpreter)."""

    seen = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        cls.seen += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_vision_parameters_become_plain_with_the_same_storage_and_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runner.vllm_plugin.batched_encoder import plain_vision_parameters

    torch.manual_seed(2)
    m = Batched1()
    lin = m.vision_model.lin
    lin.weight = _SlowParam(lin.weight.data.clone(), requires_grad=False)
    m.projector.bias = _SlowParam(m.projector.bias.data.clone(), requires_grad=False)
    lm_head = nn.Linear(3, 3)  # anything outside the vision modules is left alone
    lm_head.weight = _SlowParam(lm_head.weight.data.clone(), requires_grad=False)
    m.language_model = lm_head
    g, c, s = _inputs([(2, 3), (1, 1)])
    with torch.no_grad():
        want = m._pixel_values_to_embedding(g, c, s)
        assert _SlowParam.seen > 0
        storage = lin.weight.data_ptr()
        monkeypatch.setenv("RUNNER_PLAIN_VISION_PARAMS", "0")
        assert plain_vision_parameters(m, base=_SlowParam) == 0  # switched off: untouched
        monkeypatch.delenv("RUNNER_PLAIN_VISION_PARAMS")
        assert plain_vision_parameters(m, base=_SlowParam) == 2
        assert type(lin.weight) is nn.Parameter and lin.weight.data_ptr() == storage
        assert type(m.projector.bias) is nn.Parameter
        assert type(lm_head.weight) is _SlowParam
        _SlowParam.seen = 0
        got = m._pixel_values_to_embedding(g, c, s)
    assert _SlowParam.seen == 0  # no op detours through the subclass any more
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert plain_vision_parameters(m, base=_SlowParam) == 0  # idempotent
