"""Shared test setup: the tests folder on sys.path (fakes, pdfgen), and a pipeline runner."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus"


def corpus_dir(sub: str) -> Path:
    """A folder of ../shared/corpus, or skip the test when it is absent (fresh clones)."""
    d = CORPUS / sub
    if not d.is_dir():
        pytest.skip(f"{d} not present (the licensed corpus lives beside the repository)")
    return d


@pytest.fixture
def run_fake(tmp_path, monkeypatch):
    """Run the real CLI with a FakeEngine factory in place of the product engines.

    Returns (exit_code, output_dir, factory)."""
    from fakes import FakeFactory

    import runner.engines as engines

    def _run(input_dir: Path, *extra: str, out: Path | None = None, **fake_kwargs):
        factory = FakeFactory(**fake_kwargs)
        monkeypatch.setattr(engines, "create_engine", factory)
        from runner.cli import main

        out = out or tmp_path / "out"
        code = main(
            [
                "--input-dir",
                str(input_dir),
                "--output-dir",
                str(out),
                "--engine",
                "vllm",
                "--progress",
                "none",
                "--render-workers",
                "2",
                "--log-file",
                str(tmp_path / "run.log"),
                *extra,
            ]
        )
        return code, out, factory

    return _run


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, one per test module."""
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
