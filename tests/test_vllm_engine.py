"""Tests for runner/engines/vllm_engine.py and its plugin pieces (runner/vllm_plugin/).

On a CPU box without vLLM: the engine refuses at once with an actionable message, the engine
arguments map from ``EngineConfig``, and the worker-side preprocessing has the right shapes, token
counts and bf16 values. Where vLLM imports (the GPU machine): the preprocessing equals vLLM's own
``DeepseekOCRProcessor`` tensor for tensor, and the fast processor's prompt ids equal upstream's.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.config import EngineConfig, RunConfig
from runner.engines.base import EngineUnavailable
from runner.vllm_plugin.preprocess import (
    BF16_LUT,
    ViewSpec,
    as_bf16_tensor,
    num_image_tokens,
    prepare_image,
    tile_grid,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ROOT = Path(__file__).resolve().parents[1]
GUNDAM = ViewSpec(1024, 640, True, "v1")
GUNDAM2 = ViewSpec(1024, 768, True, "v2")


def _page(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[h // 4 : h // 2] = 255  # some flat area, like paper
    return Image.fromarray(arr)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_engine_unavailable_without_vllm_says_what_to_do(tmp_path: Path) -> None:
    from runner.engines.vllm_engine import VllmEngine

    cfg = RunConfig(inputs=(), input_root=str(tmp_path), output_dir=str(tmp_path), engine="vllm")
    with pytest.raises(EngineUnavailable) as ei:
        VllmEngine(cfg)
    msg = str(ei.value)
    assert "pip install '.[vllm]'" in msg and "--engine hf" in msg and "--engine text" in msg


def test_create_engine_raises_engine_unavailable_not_import_error(tmp_path: Path) -> None:
    if HAS_VLLM and Path("/dev/nvidiactl").exists():
        pytest.skip("vLLM and a GPU are present")
    from runner.engines import create_engine

    cfg = RunConfig(inputs=(), input_root=str(tmp_path), output_dir=str(tmp_path), engine="vllm")
    with pytest.raises(EngineUnavailable):
        create_engine(cfg)


def test_engine_kwargs_follow_engine_config() -> None:
    from runner.engines.vllm_engine import GUARD_FQCN, engine_kwargs

    ec = EngineConfig(
        kv_cache_dtype="fp8",
        enable_fp8_weights=True,
        max_num_seqs=64,
        max_model_len=4096,
        load_format="dummy",
        mm_encoder_tp_mode="data",
        cpu_offload_gb=2.0,
    )
    kw = engine_kwargs(ec, "/m", guard=True)
    assert kw["quantization"] == "fp8" and kw["kv_cache_dtype"] == "fp8"
    assert kw["max_num_seqs"] == 64 and kw["max_model_len"] == 4096 and kw["load_format"] == "dummy"
    assert kw["mm_encoder_tp_mode"] == "data" and kw["cpu_offload_gb"] == 2.0
    assert kw["logits_processors"] == [GUARD_FQCN] and kw["enable_mm_embeds"] is True
    assert kw["enable_prefix_caching"] is False  # unique pages: only its per-step cost would remain
    kw2 = engine_kwargs(EngineConfig(quantization="awq", enable_fp8_weights=True), "/m", guard=False)
    assert kw2["quantization"] == "awq" and "logits_processors" not in kw2
    mod, _, cls = GUARD_FQCN.partition(":")
    assert (ROOT / (mod.replace(".", "/") + ".py")).is_file() and cls


def test_vllm_args_pass_through_last_with_dicts_merged() -> None:
    from runner.cli import build_parser, config_from_args
    from runner.config import ConfigError
    from runner.engines.vllm_engine import engine_kwargs

    args = build_parser().parse_args(
        [
            "--input-dir",
            str(ROOT / "tests"),
            "--output-dir",
            "/tmp/x",
            "--max-num-seqs",
            "1024",
            "--vllm-arg",
            "enable_prefix_caching=true",
            "--vllm-arg",
            'compilation_config={"cudagraph_mode": "PIECEWISE"}',
            "--vllm-arg",
            "tokenizer_mode=slow",
            "--vllm-arg",
            "max_num_seqs=256",
        ]
    )
    ec = config_from_args(args, (), str(ROOT / "tests")).engine_config
    kw = engine_kwargs(ec, "/m", guard=True)
    assert kw["enable_prefix_caching"] is True and kw["tokenizer_mode"] == "slow"  # default: off
    assert kw["max_num_seqs"] == 256  # applied last: the user's word wins
    # merged with what the runner sets (capture size for >512 sequences), not replacing it
    assert kw["compilation_config"] == {"max_cudagraph_capture_size": 1024, "cudagraph_mode": "PIECEWISE"}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        config_from_args(
            build_parser().parse_args(["--input-dir", ".", "--output-dir", "/tmp/x", "--vllm-arg", "oops"]),
            (),
            ".",
        )
    with pytest.raises(ConfigError, match=r"vllm\.LLM argument name"):
        EngineConfig(vllm_args=(("not a name", "1"),))


def test_adapter_for_model_reads_local_config(tmp_path: Path) -> None:
    from runner.engines.vllm_engine import adapter_for_model, view_spec

    (tmp_path / "config.json").write_text('{"architectures": ["DeepseekOCR2ForCausalLM"]}')
    a = adapter_for_model(str(tmp_path))
    assert a.key == "deepseek-ocr-2"
    assert view_spec(a, None) == GUNDAM2
    assert adapter_for_model("deepseek-ai/DeepSeek-OCR").key == "deepseek-ocr"


def test_bf16_lut_is_upstream_normalisation_then_bf16_cast() -> None:
    import torch

    u = torch.arange(256, dtype=torch.uint8)
    want = u.float().div(255).sub_(torch.tensor(0.5)).div_(torch.tensor(0.5)).to(torch.bfloat16)
    assert np.array_equal(want.view(torch.int16).numpy().view(np.uint16), BF16_LUT)


@pytest.mark.parametrize(
    "size,spec,tiles,tokens",
    [
        ((1191, 1684), GUNDAM, (2, 3), 273 + 30 * 21),  # A4 at 144 dpi: global 16x17+1, tiles 30 rows of 21
        ((600, 500), GUNDAM, (1, 1), 273),
        ((1684, 1191), GUNDAM, (3, 2), 273 + 20 * 31),
        ((1191, 1684), ViewSpec(1280, 1280, False, "v1"), (1, 1), 20 * 21 + 1),
        ((1191, 1684), GUNDAM2, (2, 3), 257 + 6 * 144),
    ],
)
def test_tiles_and_token_counts(
    size: tuple[int, int], spec: ViewSpec, tiles: tuple[int, int], tokens: int
) -> None:
    assert tile_grid(*size, spec) == tiles
    assert num_image_tokens(spec, tiles) == tokens


def test_prepare_image_shapes_and_values() -> None:
    img = _page(1191, 1684)
    p = prepare_image(img, GUNDAM)
    # the views travel as uint8 pixels; the model side normalises them (pixels_to_model_dtype)
    assert p.global_view.shape == (3, 1024, 1024) and p.global_view.dtype == np.uint8
    assert p.crops.shape == (6, 3, 640, 640) and p.crops.dtype == np.uint8
    assert p.tiles == (2, 3) and p.num_image_tokens == 903
    # the padding of the global view is colour 127 -> bf16 of (127/255 - .5)/.5
    assert p.global_view[0, 0, 0] == 127
    assert as_bf16_tensor(p.global_view)[0, 0, 0].view(torch.int16).item() == BF16_LUT[127].astype(np.int16)
    # first tile = top-left of the image resized to the 2x3 grid
    resized = np.asarray(img.resize((1280, 1920)))[:640, :640]
    assert np.array_equal(p.crops[0], resized.transpose(2, 0, 1))
    small = prepare_image(_page(500, 400), GUNDAM)
    assert small.crops.shape == (0, 3, 640, 640) and small.tiles == (1, 1)


@pytest.mark.parametrize("size", [(1191, 1684), (1684, 1191), (2000, 700), (700, 1500)])
def test_prepare_image_equals_the_per_tile_pil_path(size: tuple[int, int]) -> None:
    """The vectorised tiles and global view equal upstream's sequence of PIL operations (resize to
    the grid, crop each tile row by row, pad the global view), converted one image at a time."""
    from PIL import Image, ImageOps

    from runner.vllm_plugin.preprocess import tile_grid

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    p = prepare_image(img, GUNDAM)
    wt, ht = tile_grid(*size, GUNDAM)
    assert p.tiles == (wt, ht) and (wt, ht) != (1, 1)
    resized = img.resize((640 * wt, 640 * ht))
    want = [
        np.asarray(resized.crop((x, y, x + 640, y + 640))).transpose(2, 0, 1)
        for i in range(wt * ht)
        for x, y in [((i % wt) * 640, (i // wt) * 640)]
    ]
    assert p.crops.flags.c_contiguous and np.array_equal(p.crops, np.stack(want))
    pad = ImageOps.pad(img, (1024, 1024), color=(127, 127, 127))
    assert p.global_view.flags.c_contiguous
    assert np.array_equal(p.global_view, np.asarray(pad).transpose(2, 0, 1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_uint8_views_normalise_to_upstreams_values(dtype: str) -> None:
    """The model-side normalisation of the uint8 views (``pixels_to_model_dtype``) gives what
    upstream's processor computes in float32, cast to the model's dtype as vLLM does; float
    inputs (vLLM's profiling) pass unchanged; lists (mixed view sizes) convert per tensor."""
    from runner.vllm_plugin.batched_encoder import _LUT_CHUNK, pixels_to_model_dtype

    dt = getattr(torch, dtype)
    u = torch.arange(256, dtype=torch.uint8)
    want = (((u.float() / 255.0) - 0.5) / 0.5).to(dt)
    out = pixels_to_model_dtype({"pixel_values": u.view(1, 1, 16, 16)}, dt)["pixel_values"]
    assert out.dtype == dt and torch.equal(out.reshape(-1), want)
    if dt == torch.bfloat16:  # the render workers' table and the CPU path agree bit for bit
        assert np.array_equal(out.view(torch.int16).reshape(-1).numpy().view(np.uint16), BF16_LUT)
        assert torch.equal(as_bf16_tensor(u.numpy()), out.reshape(-1))
    # a tensor larger than one lookup chunk, a list, and a float tensor left as it is
    big = torch.randint(0, 256, (_LUT_CHUNK + 1000,), dtype=torch.uint8)
    crops = [big[:5000].view(2, 50, 50), big[5000:5300].view(3, 10, 10)]
    flt = torch.randn(1, 3, 4, 4, dtype=dt)
    res = pixels_to_model_dtype({"pixel_values": flt, "images_crop": crops, "images_spatial_crop": u}, dt)
    assert res["pixel_values"] is flt and res["images_spatial_crop"] is u
    assert [torch.equal(a, want[b.long()]) for a, b in zip(res["images_crop"], crops)] == [True, True]
    whole = pixels_to_model_dtype({"images_crop": big}, dt)["images_crop"]
    assert torch.equal(whole, want[big.long()])


def _dummy_model_dir(name: str) -> Path | None:
    for base in (os.environ.get("OCR_DUMMY_MODELS"), str(ROOT / ".gpu_carry" / "models")):
        if base and (Path(base) / name / "tokenizer.json").is_file():
            return Path(base) / name
    return None


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM's processor needs vLLM (and torchvision): GPU machine")
@pytest.mark.parametrize(
    "model,spec",
    [
        ("deepseek-ocr", GUNDAM),
        ("deepseek-ocr", ViewSpec(1280, 1280, False, "v1")),
        ("deepseek-ocr", ViewSpec(1024, 1024, False, "v1")),
        ("deepseek-ocr-2", GUNDAM2),
    ],
)
def test_prepared_tensors_equal_vllm_processor(model: str, spec: ViewSpec) -> None:
    import torch
    from transformers import AutoTokenizer
    from vllm.transformers_utils.processors.deepseek_ocr import DeepseekOCRProcessor

    from runner.vllm_plugin.batched_encoder import pixels_to_model_dtype
    from runner.vllm_plugin.fast_processor import _prepared_token_count, prepared_to_mm_data

    mdir = _dummy_model_dir(model)
    if mdir is None:
        pytest.skip("no dummy model folder (tools/make_dummy_model.py) for the tokenizer")
    tok = AutoTokenizer.from_pretrained(str(mdir))
    proc = DeepseekOCRProcessor(
        tok, image_size=spec.image_size, base_size=spec.base_size, strategy=spec.strategy
    )
    prompt = "<image>\n<|grounding|>Convert the document to markdown."
    for k, (w, h) in enumerate([(1191, 1684), (1684, 1191), (700, 600), (2000, 900)]):
        img = _page(w, h, seed=k)
        ref = proc(prompt=prompt, images=[img], crop_mode=spec.crop_mode)
        raw = prepared_to_mm_data(prepare_image(img, spec))
        assert raw["pixel_values"].dtype == torch.uint8  # normalised in the model, on the GPU
        mine = {**raw, **pixels_to_model_dtype(raw, torch.bfloat16)}
        assert torch.equal(mine["pixel_values"], ref["pixel_values"].to(torch.bfloat16))
        assert torch.equal(mine["images_crop"], ref["images_crop"].to(torch.bfloat16))
        assert torch.equal(mine["images_spatial_crop"], ref["images_spatial_crop"])
        n_ref = int(ref["num_image_tokens"][0])
        item = {k2: v[0] if k2 != "images_crop" else v for k2, v in mine.items()}
        assert _prepared_token_count(item, spec.strategy) == n_ref
        # prompt ids: BOS + text + one <image> expanded to n_ref ids, as upstream
        ids = ref["input_ids"][0].tolist()
        image_id = tok.convert_tokens_to_ids("<image>")
        assert ids.count(image_id) == n_ref
        mine_ids = [tok.bos_token_id]
        for j, piece in enumerate(prompt.split("<image>")):
            if j:
                mine_ids += [image_id] * n_ref
            mine_ids += tok.encode(piece, add_special_tokens=False)
        assert mine_ids == ids


# -- the feeding thread, against a fake vLLM (CPU) ------------------------------------------------
class _FakeTokenizer:
    eos_token_id = 1
    unk_token_id = None

    def convert_tokens_to_ids(self, tok: str) -> int:
        from runner.adapters import EOS_TOKEN

        return 1 if tok == EOS_TOKEN else 128815 + abs(hash(tok)) % 11


class _DecodingTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        from runner.adapters import EOS_TOKEN

        assert skip_special_tokens is False  # grounding tags are special tokens: they must stay
        return "".join(EOS_TOKEN if i == 1 else "# page " for i in ids)


class _FakeLLMEngine:
    """Finishes each request after a few steps; can be told to die."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.die_after: int | None = None
        self.steps = 0

    def add_request(self, rid: str, prompt: dict, params: object) -> None:
        assert "multi_modal_data" in prompt and "multi_modal_uuids" in prompt
        self.running[rid] = 3

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running)

    def step(self) -> list:
        from types import SimpleNamespace

        self.steps += 1
        if self.die_after is not None and self.steps > self.die_after:
            raise RuntimeError("EngineDeadError (fake)")
        done = []
        for rid in list(self.running):
            self.running[rid] -= 1
            if self.running[rid] == 0:
                del self.running[rid]
                # detokenize=False: vLLM hands back token ids only, the engine decodes once
                comp = SimpleNamespace(
                    text="", finish_reason="length", stop_reason=None, token_ids=[5] * 6 + [1]
                )
                done.append(
                    SimpleNamespace(request_id=rid, finished=True, outputs=[comp], prompt_token_ids=[0] * 9)
                )
        return done


def _fake_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from runner.engines import vllm_engine as ve

    monkeypatch.setenv("RUNNER_ASSUME_GPU", "1")
    monkeypatch.setattr(ve, "vllm_unavailable_reason", lambda: None)
    cfg = RunConfig(inputs=(), input_root=str(tmp_path), output_dir=str(tmp_path), engine="vllm")
    eng = ve.VllmEngine(cfg)
    fake = _FakeLLMEngine()

    def make_request(req):
        return {"prompt": "p", "multi_modal_data": {"image": {}}, "multi_modal_uuids": {"image": ["k"]}}, None

    monkeypatch.setattr(eng, "_make_request", make_request)
    eng._llm = type("L", (), {"llm_engine": fake})()
    eng._tokenizer = _DecodingTokenizer()
    eng._start_thread()
    return eng, fake


def _req(i: int):
    from runner.records import PageImage, PageRequest

    img = PageImage("d", i, 4, 4, "RGB", b"\0" * 48, 144.0, 1, 1, 0.0, False, "", "")
    return PageRequest(f"r{i}", img, "clean")


def test_feeding_thread_streams_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    eng, _ = _fake_engine(tmp_path, monkeypatch)
    eng.submit([_req(i) for i in range(5)])
    got = []
    t0 = time.time()
    while len(got) < 5 and time.time() - t0 < 10:
        got += eng.poll(0.1)
    assert sorted(o.request_id for o in got) == [f"r{i}" for i in range(5)]
    assert all(o.output_tokens == 7 and o.prompt_tokens == 9 and o.stopped_by_eos is False for o in got)
    assert all(o.text == "# page " * 6 for o in got)  # decoded once, the EOS token text removed
    assert eng.pending() == 0
    eng._stop.set()


def test_dead_engine_raises_engine_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from runner.engines.base import EngineDied

    eng, fake = _fake_engine(tmp_path, monkeypatch)
    fake.die_after = 1
    eng.submit([_req(i) for i in range(3)])
    with pytest.raises(EngineDied):
        t0 = time.time()
        while time.time() - t0 < 10:
            eng.poll(0.1)
    assert eng.pending() == 3  # the scheduler resubmits these after restart()


class _SyncClientLikeVllm026:
    """vLLM 0.26's ``SyncMPClient`` as far as a dead engine core goes: ``get_output`` waits on a
    queue; when the core process dies, the monitor thread only sets ``resources.engine_dead``
    and the output thread exits without queueing anything, so a waiting ``step()`` never wakes."""

    def __init__(self) -> None:
        import queue as _q
        from types import SimpleNamespace

        self.resources = SimpleNamespace(engine_dead=False)
        self.outputs_queue: _q.Queue = _q.Queue()

    def get_output(self) -> list:
        out = self.outputs_queue.get()
        if isinstance(out, Exception):
            raise RuntimeError("EngineDeadError") from out
        return out


class _HangingOnDeathLLMEngine(_FakeLLMEngine):
    def __init__(self) -> None:
        super().__init__()
        self.engine_core = _SyncClientLikeVllm026()
        self.killed = False

    def step(self) -> list:
        if self.killed:  # the core is gone: wait for outputs that will never come
            return self.engine_core.get_output()
        return super().step()


def test_killed_engine_core_is_detected_although_step_never_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPU session 3: the engine core was SIGKILLed 4 s after 'ready'; vLLM's client logged
    'engine core exited unexpectedly' and the run then waited with 96 pages in flight until the
    command's time limit. poll() must report the death from the client's flag, and close() must
    not hang on the feeding thread blocked in step()."""
    import time

    from runner.engines.base import EngineDied

    eng, _ = _fake_engine(tmp_path, monkeypatch)
    fake = _HangingOnDeathLLMEngine()
    eng._stop.set()
    eng._llm = type("L", (), {"llm_engine": fake})()
    eng._start_thread()
    fake.killed = True
    eng.submit([_req(i) for i in range(3)])
    time.sleep(0.3)  # the feeding thread is now blocked inside step()
    assert eng.poll(0.05) == []  # alive as far as vLLM knows: nothing to report yet
    fake.engine_core.resources.engine_dead = True  # vLLM's monitor thread saw the process exit
    with pytest.raises(EngineDied, match="engine core process died"):
        eng.poll(0.05)
    assert eng.pending() == 3  # resubmitted by the scheduler after restart()
    thread = eng._thread
    t0 = time.time()
    eng._stop.set()
    eng._inbox.put(None)
    thread.join(5)
    assert not thread.is_alive() and time.time() - t0 < 5  # woken, not left blocked for good


def test_finished_but_unpolled_outputs_stay_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler polls only while pending() > 0: an output vLLM finished but poll has not
    returned yet must still count, or it is stranded (the GPU-machine CLI stall)."""
    import time

    eng, fake = _fake_engine(tmp_path, monkeypatch)
    eng.submit([_req(i) for i in range(3)])
    t0 = time.time()
    while eng._outbox.qsize() < 3 and time.time() - t0 < 10:
        time.sleep(0.01)
    assert not fake.running and eng._outbox.qsize() == 3
    assert eng.pending() == 3
    got = eng.poll(0.1)
    assert len(got) == 3 and eng.pending() == 0
    eng._stop.set()


def test_vllm_plugin_entry_point_is_installed_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM spawns its engine core: our model subclasses (the batched vision encoder) reach that
    process only through the ``vllm.general_plugins`` entry point."""
    import sys
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert eps["deepseek_ocr_pipeline"].value == "runner.vllm_plugin:register_all"
    fn = eps["deepseek_ocr_pipeline"].load()
    monkeypatch.setenv("RUNNER_VLLM_PLUGIN", "0")
    monkeypatch.delitem(sys.modules, "runner.vllm_plugin.fast_processor", raising=False)
    fn()  # off: returns without importing vLLM
    assert "runner.vllm_plugin.fast_processor" not in sys.modules


def test_switch_interval_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from runner.engines.vllm_engine import _set_switch_interval

    before = sys.getswitchinterval()
    try:
        monkeypatch.delenv("RUNNER_SWITCH_INTERVAL_MS", raising=False)
        _set_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.001)
        monkeypatch.setenv("RUNNER_SWITCH_INTERVAL_MS", "0.5")
        _set_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        sys.setswitchinterval(0.005)
        monkeypatch.setenv("RUNNER_SWITCH_INTERVAL_MS", "0")  # leave the interpreter's setting
        _set_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)


def test_warmup_raises_when_the_engine_core_dies_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from runner.engines.base import EngineDied

    eng, _ = _fake_engine(tmp_path, monkeypatch)
    eng._stop.set()
    fake = _HangingOnDeathLLMEngine()
    eng._llm = type("L", (), {"llm_engine": fake})()
    fake.add_request("w0", {"multi_modal_data": {}, "multi_modal_uuids": {}}, None)
    fake.killed = True  # the first real batch killed the core: step() now waits for good
    threading.Timer(0.3, lambda: setattr(fake.engine_core.resources, "engine_dead", True)).start()
    with pytest.raises(EngineDied, match="during warm-up"):
        eng._step_until_idle(fake, check_s=0.05)


def test_warmup_plan_covers_the_step_shapes_of_a_real_run() -> None:
    """Session 3: 512 identical warm-up pages with 16 tokens each only ever made steps whose
    token counts are multiples of 16; a real run's are not, and Triton compiles its MoE kernel per
    such shape class. The plan mixes prompt lengths, output lengths and arrival times."""
    from runner.engines.vllm_engine import warmup_plan
    from runner.vllm_plugin.preprocess import num_image_tokens, tile_grid

    plan = warmup_plan(512, "large")
    assert len(plan) == 512 + 8
    main = [it for it in plan if it.resolution is None]
    tokens = {num_image_tokens(GUNDAM, tile_grid(*it.size, GUNDAM)) for it in main}
    assert len(tokens) >= 3 and any(t % 16 for t in tokens)  # several prompt lengths, not all /16
    lengths = {it.max_tokens for it in plan}
    assert min(lengths) == 16 and len(lengths) >= 10  # the decode batch shrinks step by step
    late = sum(it.late for it in main)
    assert 100 < late < 256  # a third arrives while the rest decode
    assert sum(1 for it in plan if it.resolution == "large") == 8
    assert warmup_plan(4) == warmup_plan(4, None) and len(warmup_plan(4, "large")) == 4  # tiny engines


def test_profile_windows_parse_and_reject_overlaps() -> None:
    from runner.engines.vllm_engine import parse_profile_windows

    assert parse_profile_windows("5:10, 300:30") == [(5, 10), (300, 30)]
    assert parse_profile_windows("7") == [(7, 10)]
    for bad in ("5:10,8:2", "-1:3", "4:0"):
        with pytest.raises(ValueError):
            parse_profile_windows(bad)


def test_step_profiler_windows_follow_the_feeding_threads_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RUNNER_PROFILE_DIR: the feeding thread starts and stops vLLM's profiler at the given
    steps, and each window's kernel table is kept under its own name with its wall time."""
    import time

    calls: list[tuple[str, int]] = []
    monkeypatch.setenv("RUNNER_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("RUNNER_PROFILE_STEPS", "1:2,4:1")
    eng, fake = _fake_engine(tmp_path, monkeypatch)

    def start_profile() -> None:
        calls.append(("start", fake.steps))

    def stop_profile() -> None:
        calls.append(("stop", fake.steps))
        (tmp_path / "profiler_out_0.txt").write_text(f"table after step {fake.steps}\n")

    fake.start_profile = start_profile  # type: ignore[attr-defined]
    fake.stop_profile = stop_profile  # type: ignore[attr-defined]
    # requests finish after 3 steps: submit in two batches so the engine runs >= 5 steps
    eng.submit([_req(i) for i in range(2)])
    got: list = []
    t0 = time.time()
    while len(got) < 2 and time.time() - t0 < 10:
        got += eng.poll(0.05)
    eng.submit([_req(i) for i in range(2, 4)])
    while len(got) < 4 and time.time() - t0 < 10:
        got += eng.poll(0.05)
    eng._stop.set()
    assert calls == [("start", 1), ("stop", 3), ("start", 4), ("stop", 5)]
    first = (tmp_path / "profile_1_2.txt").read_text()
    assert first.startswith("table after step 3") and "window: steps 1..2, wall" in first
    assert (tmp_path / "profile_4_1.txt").read_text().startswith("table after step 5")
    assert not (tmp_path / "profiler_out_0.txt").exists()


@pytest.mark.skipif(not HAS_VLLM, reason="our model classes import vLLM: GPU machine")
def test_model_subclasses_have_vllm_current_init_signature() -> None:
    """vLLM builds a model class with ``vllm_config=...`` only when its ``__init__`` names
    ``vllm_config``; ``*args, **kwargs`` made it guess an old-style class and fail at load time
    (GPU session 5)."""
    import inspect

    from vllm.model_executor.models.interfaces_base import _check_vllm_model_init

    from runner.vllm_plugin.fast_processor import ARCHITECTURES

    for cls in ARCHITECTURES.values():
        params = inspect.signature(cls.__init__).parameters
        assert "vllm_config" in params and "prefix" in params, cls
        assert _check_vllm_model_init(cls), cls
