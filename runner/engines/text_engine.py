"""Text-layer engine: the PDF's own text layer as Markdown (pymupdf4llm), no model, no GPU.

The render workers already ran pymupdf4llm on each page (``PageImage.text_markdown``), so this
engine only hands that text back. Pages without a text layer (scans) come back empty with
``finish_reason="no_text_layer"`` and the scheduler records them as failed: the text engine
cannot read pixels.
"""

from __future__ import annotations

import time

from runner.config import RunConfig
from runner.engines.base import BatchEngine
from runner.records import EngineOutput, PageRequest


class TextEngine(BatchEngine):
    name = "text"
    needs_pixels = False
    needs_text_markdown = True
    max_batch = 64
    supports_resolution = False
    worker_hook = None

    def __init__(self, config: RunConfig | None = None) -> None:
        super().__init__()

    def generate_batch(self, batch: list[PageRequest]) -> list[EngineOutput]:
        out = []
        for req in batch:
            t0 = time.perf_counter()
            md = req.image.text_markdown
            if md is None:
                md = req.image.text_layer
            md = md.strip()
            out.append(
                EngineOutput(
                    request_id=req.request_id,
                    text=md,
                    finish_reason="stop" if md else "no_text_layer",
                    stopped_by_eos=None,
                    seconds=time.perf_counter() - t0,
                    error=None if md else "page has no text layer (scanned?); use --engine vllm or hf",
                )
            )
        return out
