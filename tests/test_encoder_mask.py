"""OCR-2's encoder mask built with tensor operations (runner/vllm_plugin/encoder_mask.py) against a
copy of upstream's loop (vLLM 0.26 ``deepencoder2.py``) on CPU, and against vLLM's own module on
the GPU machine."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from runner.vllm_plugin import encoder_mask as em


class UpstreamInner(torch.nn.Module):
    """``CustomQwen2ModelInner._create_custom_4d_mask`` as vLLM 0.26 has it (copied)."""

    def _create_custom_4d_mask(self, sequence_length, dtype, device, batch_size, token_type_ids):  # type: ignore[no-untyped-def]
        min_dtype = torch.finfo(dtype).min
        masks = []
        for b in range(batch_size):
            mask = torch.full(
                (sequence_length, sequence_length), fill_value=min_dtype, dtype=dtype, device=device
            )
            type_ids = token_type_ids[b]
            image_positions = (type_ids == 0).nonzero(as_tuple=True)[0]
            text_positions = (type_ids == 1).nonzero(as_tuple=True)[0]
            if len(image_positions) > 0:
                mask[image_positions[:, None], image_positions] = 0.0
            for i, text_pos in enumerate(text_positions):
                if len(image_positions) > 0:
                    mask[text_pos, image_positions] = 0.0
                mask[text_pos, text_positions[: i + 1]] = 0.0
            masks.append(mask)
        return torch.stack(masks, dim=0).unsqueeze(1)


def _encoder_type_ids(bs: int, n_query: int) -> torch.Tensor:
    """What ``Qwen2Decoder2Encoder.forward`` passes: n image tokens, then n queries."""
    return torch.cat(
        [torch.zeros(bs, n_query, dtype=torch.long), torch.ones(bs, n_query, dtype=torch.long)], dim=1
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("bs", "n_query"), [(1, 144), (3, 256), (2, 5)])
def test_equals_upstream_for_the_encoders_layout(bs: int, n_query: int, dtype: torch.dtype) -> None:
    t = _encoder_type_ids(bs, n_query)
    want = UpstreamInner()._create_custom_4d_mask(2 * n_query, dtype, "cpu", bs, t)
    got = em.custom_4d_mask(2 * n_query, dtype, "cpu", bs, t)
    assert got.shape == want.shape == (bs, 1, 2 * n_query, 2 * n_query)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def test_equals_upstream_for_arbitrary_type_ids() -> None:
    """Interleaved image/query tokens, other type values (neither kind: attend nothing, attended
    by nothing), views without images or without queries."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        bs, length = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        t = torch.randint(0, 3, (bs, length), generator=g)
        t[0] = torch.randint(0, 2, (length,), generator=g)  # a view of only 0/1 too
        want = UpstreamInner()._create_custom_4d_mask(length, torch.float32, "cpu", bs, t)
        assert torch.equal(em.custom_4d_mask(length, torch.float32, "cpu", bs, t), want)
    for fill in (0, 1):  # all image tokens, all queries
        t = torch.full((2, 7), fill)
        assert torch.equal(
            em.custom_4d_mask(7, torch.float32, "cpu", 2, t),
            UpstreamInner()._create_custom_4d_mask(7, torch.float32, "cpu", 2, t),
        )


def test_patch_once_can_be_turned_off_and_falls_back_on_odd_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    outer = torch.nn.Sequential(torch.nn.Linear(2, 2), UpstreamInner())
    inner: Any = outer[1]
    monkeypatch.setenv("RUNNER_FAST_ENCODER_MASK", "0")
    assert em.patch_encoder_mask(outer) == 0
    monkeypatch.delenv("RUNNER_FAST_ENCODER_MASK")
    assert em.patch_encoder_mask(outer) == 1
    assert em.patch_encoder_mask(outer) == 0  # already patched
    t = _encoder_type_ids(2, 4)
    calls = []
    up = inner._runner_upstream_mask
    inner._runner_upstream_mask = lambda *a: calls.append(1) or up(*a)
    got = inner._create_custom_4d_mask(8, torch.float32, "cpu", 2, t)
    assert calls == []  # the fast path
    assert torch.equal(got, UpstreamInner()._create_custom_4d_mask(8, torch.float32, "cpu", 2, t))
    inner._create_custom_4d_mask(9, torch.float32, "cpu", 2, torch.zeros(2, 8, dtype=torch.long))
    assert calls == [1]  # type ids shorter than the sequence: upstream decides what that means


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (GPU machine)")
def test_vllm_qwen2_encoder_output_unchanged_by_the_patch() -> None:
    """vLLM's own OCR-2 Qwen2 encoder (2 layers, random weights), upstream mask vs the patched one:
    the same output, on CUDA where there is one."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.deepencoder2 import build_qwen2_decoder_as_encoder

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig()):
        enc = build_qwen2_decoder_as_encoder(decoder_layer=2).to(dev, torch.float32).eval()
        x = torch.randn(3, 896, 12, 12, device=dev)  # SAM's 768² output layout: 144 tokens
        with torch.no_grad():
            want = enc(x)
            assert em.patch_encoder_mask(enc) == 1
            got = enc(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
