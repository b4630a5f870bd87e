"""The Transformers engine's DeepSeek-OCR (v1) path, on CPU with a tiny random checkpoint in
upstream's layout (real Transformers code: ``UnlimitedOcrForConditionalGeneration``).

Against vLLM's own DeepSeek-OCR the path is checked on the GPU machine (``tools/check_hf_ocr1.py``:
same random checkpoint with the full vision towers, float32, greedy; session 8 on an H100: same
prompts, same 24 tokens on both pages, log-probabilities within 0.0013).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers", minversion="5.23")

import torch
from conftest_hf import page_image, run_engine, tiny_ocr1_model  # noqa: F401
from safetensors.torch import load_file, save_file
from tiny_model import EXPECTED_IDS, FULL_OCR1_CLIP, FULL_OCR1_SAM, upstream_ocr1_config

from runner.adapters import DEEPSEEK_OCR
from runner.config import EngineConfig
from runner.engines.base import EngineUnavailable
from runner.engines.hf_engine import HfEngine, native_ocr1_config
from runner.records import EngineOutput, PageRequest
from runner.vllm_plugin.preprocess import ViewSpec, num_image_tokens, tile_grid

SHARED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "models" / "deepseek-ocr" / "config.json"


def _req(i: int, size: tuple[int, int], **kw: Any) -> PageRequest:
    kw.setdefault("prompt_mode", "clean")
    return PageRequest(request_id=f"r{i}", image=page_image(i, size), **kw)


def _run(engine: HfEngine, reqs: list[PageRequest]) -> list[EngineOutput]:
    return run_engine(engine, reqs)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def engine(tiny_ocr1_model: Path) -> HfEngine:  # noqa: F811
    e = HfEngine(EngineConfig(model=str(tiny_ocr1_model), device="cpu", max_tokens=6, hf_batch_size=4))
    e.start()
    return e


def test_published_config_translates_to_the_published_sizes() -> None:
    if SHARED_CONFIG.is_file():
        upstream = json.loads(SHARED_CONFIG.read_text())
    else:  # the shared folder is optional: the same published values, as the tiny builder writes them
        upstream = upstream_ocr1_config(
            {"hidden_size": 1280, "num_hidden_layers": 12, "n_routed_experts": 64, "num_experts_per_tok": 6},
            FULL_OCR1_SAM,
            FULL_OCR1_CLIP,
        )
    from transformers import UnlimitedOcrConfig

    cfg = UnlimitedOcrConfig(**native_ocr1_config(upstream))
    t, sam, clip = cfg.text_config, cfg.vision_config.sam_config, cfg.vision_config.encoder_config
    assert (t.hidden_size, t.num_hidden_layers, t.n_routed_experts, t.num_experts_per_tok) == (
        1280,
        12,
        64,
        6,
    )
    assert t.layer_types == ["full_attention"] * 12  # DeepSeek-OCR attends to the whole sequence
    assert t.mlp_layer_types == ["dense"] + ["sparse"] * 11
    assert cfg.tie_word_embeddings is False and t.tie_word_embeddings is False  # upstream has its own lm_head
    assert (sam.hidden_size, sam.num_hidden_layers, list(sam.global_attn_indexes)) == (768, 12, [2, 5, 8, 11])
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads) == (1024, 24, 16)
    assert (clip.intermediate_size, clip.hidden_act, clip.patch_size) == (4096, "quick_gelu", 14)
    # the projector's input is CLIP's width next to SAM's last channels: 2048, as upstream's
    assert sam.downsample_channels[-1] + clip.hidden_size == upstream["projector_config"]["input_dim"] == 2048


def test_every_upstream_weight_lands_where_it_belongs(engine: HfEngine, tiny_ocr1_model: Path) -> None:  # noqa: F811
    saved = load_file(str(tiny_ocr1_model / "model.safetensors"))
    model = engine.loaded.model  # type: ignore[union-attr]
    state = model.state_dict()
    clip0 = "model.vision_model.transformer.layers.0.self_attn.qkv_proj.weight"
    q, k, v = saved[clip0].chunk(3)
    attn = model.model.vision_tower.vision_encoder.encoder.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, q) and torch.equal(attn.v_proj.weight, v)
    assert torch.equal(attn.k_proj.weight, k)
    assert torch.equal(state["lm_head.weight"], saved["lm_head.weight"])
    assert not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])  # untied
    assert torch.equal(model.model.image_newline, saved["model.image_newline"])
    assert torch.equal(model.model.view_separator, saved["model.view_seperator"])  # upstream's spelling
    sam_pos = model.model.vision_tower.sam_encoder.pos_embed
    assert torch.equal(sam_pos, saved["model.sam_model.pos_embed"])
    experts = [k for k in saved if ".mlp.experts." in k]
    assert experts  # upstream stores one tensor per expert; Transformers merges them on load
    gate_up = model.model.language_model.layers[1].mlp.experts.gate_up_proj
    inter = saved["model.layers.1.mlp.experts.0.gate_proj.weight"].shape[0]
    assert torch.equal(gate_up[0, :inter], saved["model.layers.1.mlp.experts.0.gate_proj.weight"])


def test_pages_get_upstreams_image_token_count_and_batch_like_single_pages(engine: HfEngine) -> None:
    # A4-shaped pages at two sizes: tiled (Gundam crops) and untiled (smaller than a 640 tile)
    big, small = (1190, 1684), (420, 594)
    spec = ViewSpec(1024, 640, True, "v1")
    batch = _run(engine, [_req(0, big), _req(1, small), _req(2, big)])
    alone = [_run(engine, [r])[0] for r in (_req(0, big), _req(1, small), _req(2, big))]
    for out, size in zip(batch, (big, small, big)):
        n_image = num_image_tokens(spec, tile_grid(*size, spec))
        # BOS + the prompt's text tokens + the image tokens; the tiled page has 903-912 (README)
        assert out.prompt_tokens is not None and out.prompt_tokens > n_image
        assert out.output_tokens == 6 and out.error is None
    assert 903 <= num_image_tokens(spec, tile_grid(*big, spec)) <= 912
    assert num_image_tokens(spec, tile_grid(*small, spec)) == 16 * 17 + 1
    # left padding: a batch gives each page what it gets alone
    assert [o.text for o in batch] == [o.text for o in alone]
    assert [o.prompt_tokens for o in batch] == [o.prompt_tokens for o in alone]


def test_every_v1_resolution_mode_runs(engine: HfEngine) -> None:
    for name in ("tiny", "small", "base", "large"):
        res = DEEPSEEK_OCR.resolution(name)
        other = HfEngine(
            EngineConfig(model=engine.engine_config.model, device="cpu", max_tokens=2, resolution=name)
        )
        other.attach(engine.loaded)  # type: ignore[arg-type]
        other.start()
        (out,) = _run(other, [_req(0, (1190, 1684))])
        q = (res.base_size // 16 + 3) // 4
        assert out.error is None and out.prompt_tokens is not None and out.prompt_tokens > q * (q + 1)


def test_a_checkpoint_with_a_missing_weight_is_refused(tiny_ocr1_model: Path, tmp_path: Path) -> None:  # noqa: F811
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_ocr1_model.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(tiny_ocr1_model / "model.safetensors"))
    del weights["model.image_newline"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EngineUnavailable, match=r"missing: model\.image_newline"):
        HfEngine(EngineConfig(model=str(broken), device="cpu")).start()


def test_transformers_without_the_v1_classes_says_what_to_install(
    tiny_ocr1_model: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import transformers

    # an older Transformers: the lazy module has no such class (getattr gives None here)
    monkeypatch.setattr(transformers, "UnlimitedOcrForConditionalGeneration", None)
    with pytest.raises(EngineUnavailable, match=r"transformers>=5\.23"):
        HfEngine(EngineConfig(model=str(tiny_ocr1_model), device="cpu")).start()


def test_image_token_id_comes_from_the_tokenizer(engine: HfEngine) -> None:
    assert engine.loaded is not None
    assert engine.loaded.special.image == EXPECTED_IDS["<image>"] == engine.loaded.model.config.image_token_id
