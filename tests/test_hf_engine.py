"""Tests for runner/engines/hf_engine.py with a tiny random DeepSeek-OCR-2 (real code, CPU).

Engine level: output fields, EOS handling, forced lengths, the windowed guard, special tokens,
upstream-format checkpoints, resolution modes. End to end: the real CLI over a generated PDF.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from conftest_hf import page_image, run_engine, tiny_ocr2_model, tiny_ocr2_upstream_model  # noqa: F401
from tiny_model import EXPECTED_IDS, tiny_ocr2_config, upstream_style_config

from runner.adapters import DEEPSEEK_OCR_2, EOS_TOKEN, Resolution
from runner.config import EngineConfig
from runner.engines.base import EngineUnavailable
from runner.engines.guard import GuardParams, reference_banned
from runner.engines.hf_engine import (
    HfEngine,
    WindowedNGramGuard,
    native_ocr2_config,
    view_kwargs,
)
from runner.records import EngineOutput, PageImage, PageRequest

# A small page: no side above 768 px, so the processor sends only the 1024 global view (257 tokens).
SMALL = (420, 594)
GLOBAL_VIEW_TOKENS = 16 * 16 + 1  # 16x16 queries + the view separator


def _page(i: int, size: tuple[int, int] = SMALL) -> PageImage:
    return page_image(i, size)  # type: ignore[no-any-return]


def _req(i: int, **kw: Any) -> PageRequest:
    kw.setdefault("prompt_mode", "clean")
    return PageRequest(request_id=f"r{i}", image=kw.pop("image", None) or _page(i), **kw)


def _run(engine: HfEngine, reqs: list[PageRequest]) -> list[EngineOutput]:
    return run_engine(engine, reqs)  # type: ignore[no-any-return]


def _engine(model: Path, **kw: Any) -> HfEngine:
    kw.setdefault("max_tokens", 8)
    engine = HfEngine(EngineConfig(model=str(model), device="cpu", **kw))
    engine.start()
    return engine


def _variant(engine: HfEngine, **kw: Any) -> HfEngine:
    """Another engine configuration sharing the loaded model (no reload)."""
    kw.setdefault("max_tokens", 8)
    other = HfEngine(EngineConfig(model=engine.engine_config.model, device="cpu", **kw))
    assert engine.loaded is not None
    other.attach(engine.loaded)
    return other


@contextlib.contextmanager
def _bias_towards(engine: HfEngine, token_id: int) -> Iterator[None]:
    """Make ``token_id`` the model's overwhelming choice at every step (a bias on the LM head)."""
    head = engine.loaded.model.lm_head  # type: ignore[union-attr]
    bias = torch.zeros(head.out_features)
    bias[token_id] = 1e4
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        yield
    finally:
        head.bias = None


@pytest.fixture(scope="module")
def engine(tiny_ocr2_model: Path) -> HfEngine:  # noqa: F811
    return _engine(tiny_ocr2_model, hf_batch_size=2)


# -- pure parts -------------------------------------------------------------------------------


def test_guard_bans_windowed_repeats_and_never_table_tags() -> None:
    td = 7
    guard = WindowedNGramGuard(prompt_len=3, ngram_size=2, window=6, exempt=[td])
    # prompt 9 9 9 (ignored), generated 5 6 5: the bigram (5, 6) was seen, so 6 is banned next.
    ids = torch.tensor([[9, 9, 9, 5, 6, 5], [9, 9, 9, td, td, td]])
    scores = guard(ids, torch.zeros(2, 10))
    assert scores[0, 6] == float("-inf")
    assert torch.isfinite(scores[0, [0, 1, 2, 3, 4, 5, 7, 8, 9]]).all()
    assert torch.isfinite(scores[1]).all()  # (td, td) repeats but td is exempt


def test_guard_forgets_outside_the_window() -> None:
    seq = [5, 6, 1, 2, 3, 4, 5]  # (5, 6) is 6 tokens back
    ids = torch.tensor([seq])
    assert WindowedNGramGuard(0, 2, 7, []).__call__(ids, torch.zeros(1, 10))[0, 6] == float("-inf")
    assert torch.isfinite(WindowedNGramGuard(0, 2, 5, [])(ids, torch.zeros(1, 10))[0]).all()


def test_guard_ignores_prompt_repeats() -> None:
    ids = torch.tensor([[5, 6, 5, 6, 5]])  # all prompt
    assert torch.isfinite(WindowedNGramGuard(5, 2, 10, [])(ids, torch.zeros(1, 10))).all()


def test_view_kwargs_follow_the_adapter_modes() -> None:
    gundam = view_kwargs(DEEPSEEK_OCR_2.resolution("gundam"))
    assert gundam == {"crop_to_patches": True, "size": {"height": 1024, "width": 1024}, "tile_size": 768}
    base = view_kwargs(DEEPSEEK_OCR_2.resolution("base"))
    assert base["crop_to_patches"] is False and base["tile_size"] == base["size"]["height"] == 1024
    with pytest.raises(ValueError, match="640px"):
        view_kwargs(Resolution("small", 640, 640, False))


def test_upstream_config_translation_defaults_to_qwen2_0_5b_encoder() -> None:
    upstream = {
        "architectures": ["DeepseekOCR2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "language_config": {
            "num_hidden_layers": 12,
            "first_k_dense_replace": 1,
            "hidden_size": 1280,
            "vocab_size": 129280,
            "n_routed_experts": 64,
            "num_experts_per_tok": 6,
        },
        "vision_config": {
            "width": {
                "qwen2-0-5b": {"dim": 896},
                "sam_vit_b": {"downsample_channels": [512, 1024], "layers": 12},
            }
        },
    }
    kw = native_ocr2_config(upstream)
    assert kw["text_config"]["mlp_layer_types"] == ["dense"] + ["sparse"] * 11
    assert kw["text_config"]["n_routed_experts"] == 64
    enc = kw["vision_config"]["encoder_config"]
    assert (enc["hidden_size"], enc["num_hidden_layers"], enc["num_attention_heads"]) == (896, 24, 14)
    assert kw["vision_config"]["sam_config"]["downsample_channels"] == [512, 896]


def test_upstream_config_translation_round_trips_the_tiny_model() -> None:
    from transformers import DeepseekOcr2Config

    tiny = tiny_ocr2_config()
    back = DeepseekOcr2Config(**native_ocr2_config(upstream_style_config(tiny)))
    for sub in ("text_config",):
        for key in ("hidden_size", "num_hidden_layers", "n_routed_experts", "mlp_layer_types", "vocab_size"):
            assert getattr(getattr(back, sub), key) == getattr(getattr(tiny, sub), key)
    assert back.vision_config.encoder_config.hidden_size == tiny.vision_config.encoder_config.hidden_size
    assert (
        back.vision_config.sam_config.downsample_channels == tiny.vision_config.sam_config.downsample_channels
    )


def test_missing_torch_is_reported_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(EngineUnavailable, match=r"pip install '\.\[hf\]'"):
        HfEngine(EngineConfig(model="x/y"))


# -- the tiny model ---------------------------------------------------------------------------


def test_special_tokens_come_from_the_tokenizer(engine: HfEngine) -> None:
    special = engine.loaded.special  # type: ignore[union-attr]
    assert special.eos == EXPECTED_IDS[EOS_TOKEN]
    assert special.image == EXPECTED_IDS["<image>"] == engine.loaded.model.config.image_token_id  # type: ignore[union-attr]
    assert set(special.whitelist) == {EXPECTED_IDS[t] for t in ("<td>", "</td>", "<tr>", "</tr>")}
    assert engine.loaded.prompt_prefix == "<｜begin▁of▁sentence｜>"  # type: ignore[union-attr]


def test_outputs_have_every_field_and_the_batch_is_bounded(engine: HfEngine) -> None:
    reqs = [_req(0), _req(1, prompt_mode="grounded"), _req(2, temperature=0.7)]
    engine.submit(reqs)
    first = engine.poll()
    assert len(first) == 2 and engine.pending() == 1  # hf_batch_size=2
    outs = first + engine.poll()
    assert [o.request_id for o in outs] == ["r0", "r1", "r2"]
    tok = engine.loaded.tokenizer  # type: ignore[union-attr]
    text_tokens = len(tok("<｜begin▁of▁sentence｜>" + DEEPSEEK_OCR_2.prompt("clean")).input_ids) - 1
    for o in outs:
        assert o.error is None
        assert o.output_tokens == 8 and o.finish_reason == "length" and o.stopped_by_eos is False
        assert o.prompt_tokens == text_tokens + GLOBAL_VIEW_TOKENS
        assert o.seconds > 0 and isinstance(o.text, str) and o.text
        assert len(tok(o.text, add_special_tokens=False).input_ids) >= 1


def test_resolution_base_on_a_large_page_uses_one_view(engine: HfEngine) -> None:
    wide = _page(0, (900, 380))  # wider than a 768 tile: gundam cuts it into a 2x1 grid
    gundam, base = _run(engine, [_req(0, image=wide), _req(1, image=wide, resolution="base")])
    assert gundam.error is None and base.error is None
    assert gundam.prompt_tokens is not None and base.prompt_tokens is not None
    # gundam adds 144 tokens per 768 tile; base sends the global view only
    assert gundam.prompt_tokens - base.prompt_tokens == 2 * 144


def test_eos_stops_and_is_kept_in_the_text(engine: HfEngine) -> None:
    with _bias_towards(engine, EXPECTED_IDS[EOS_TOKEN]):
        (out,) = _run(engine, [_req(0)])
    assert (out.finish_reason, out.stopped_by_eos, out.output_tokens) == ("stop", True, 1)
    assert out.text == EOS_TOKEN


def test_ignore_eos_forces_the_length(engine: HfEngine) -> None:
    forced = _variant(engine, ignore_eos=True, max_tokens=6)
    with _bias_towards(engine, EXPECTED_IDS[EOS_TOKEN]):
        (out,) = _run(forced, [_req(0)])
    assert (out.finish_reason, out.stopped_by_eos, out.output_tokens) == ("length", False, 6)
    assert EOS_TOKEN not in out.text


def test_guard_breaks_a_loop_but_not_a_table_run(engine: HfEngine) -> None:
    loop_token = 3000
    looping = _variant(engine, max_tokens=12, guard=False)
    guarded = _variant(engine, max_tokens=12, ngram_size=2, ngram_window=8)
    with _bias_towards(engine, loop_token):
        (free,) = _run(looping, [_req(0)])
        (held,) = _run(guarded, [_req(0)])
    tok = guarded.loaded.tokenizer  # type: ignore[union-attr]
    free_ids = tok(free.text, add_special_tokens=False).input_ids
    held_ids = tok(held.text, add_special_tokens=False).input_ids
    assert set(free_ids) == {loop_token}
    assert held_ids.count(loop_token) < len(held_ids)
    params = GuardParams(2, 8)
    assert all(held_ids[i] not in reference_banned(held_ids[:i], params) for i in range(len(held_ids)))

    with _bias_towards(engine, EXPECTED_IDS["<td>"]):
        (table,) = _run(guarded, [_req(1)])
    assert table.text == "<td>" * 12


@pytest.mark.slow
def test_upstream_format_checkpoint_loads_the_same_weights(
    engine: HfEngine,
    tiny_ocr2_upstream_model: Path,  # noqa: F811
) -> None:
    upstream = _engine(tiny_ocr2_upstream_model)
    assert (
        json.loads((tiny_ocr2_upstream_model / "config.json").read_text())["model_type"] == "deepseek_vl_v2"
    )
    a = _run(engine, [_req(5)])[0]
    b = _run(upstream, [_req(5)])[0]
    assert a.text == b.text and a.prompt_tokens == b.prompt_tokens


def test_unsupported_resolution_fails_at_start(engine: HfEngine) -> None:
    with pytest.raises(EngineUnavailable, match="no resolution 'tiny'"):
        _variant(engine, resolution="tiny").start()


# -- end to end through the CLI ----------------------------------------------------------------


def _baseline_module() -> Any:
    """The repository-root ``run_pdf_ocr.py`` (not a package module), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "run_pdf_ocr.py"
    spec = importlib.util.spec_from_file_location("run_pdf_ocr", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_baseline_entry_point_defaults() -> None:
    baseline = _baseline_module()
    argv = baseline.baseline_argv(["--input-dir", "in", "--render-workers", "4"])
    assert argv[-2:] == ["--render-workers", "1"]  # argparse keeps the last value
    assert argv[argv.index("--model") + 1] == "deepseek-ai/DeepSeek-OCR-2"
    assert baseline.baseline_argv(["--model=/m"]).count("--model") == 0


@pytest.mark.slow
def test_cli_end_to_end_on_cpu(tiny_ocr2_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """The baseline entry point (``--engine hf`` by default) over a generated 2-page PDF."""
    from pdfgen import text_pdf

    from runner.cli import main

    src = tmp_path / "in"
    text_pdf(src / "two.pdf", pages=2)
    out = tmp_path / "out"
    argv = _baseline_module().baseline_argv([
        "--input-dir", str(src), "--output-dir", str(out), "--model", str(tiny_ocr2_model),
        "--max-tokens", "24", "--dpi", "50", "--retries", "0", "--no-large-pass",
        "--required-labels", "", "--progress", "none", "--log-file", str(tmp_path / "run.log"),
    ])  # fmt: skip
    rc = main(argv, default_engine="hf")
    # Random weights never stop by themselves, so pages fall back to the text layer: rc 0 or 1.
    assert rc in (0, 1)
    md = out / "two.md"
    pages_jsonl = out / "two.pages.jsonl"
    assert md.is_file() and pages_jsonl.is_file()
    rows = [json.loads(line) for line in pages_jsonl.read_text().splitlines() if line.strip()]
    assert [r["page"] for r in rows] == [1, 2]
    assert all(r["status"] for r in rows)
    assert all(r["engine"] == "hf" for r in rows)
    for r in rows:  # every page went through the model once, to the forced limit
        (attempt,) = r["attempts"]
        got = (attempt["output_tokens"], attempt["finish_reason"], attempt["stopped_by_eos"])
        assert got == (24, "length", False)
        assert r["raw_text"]
    assert "Page 2 heading" in md.read_text()
