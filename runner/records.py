"""Typed records that cross module boundaries.

Flow: render workers produce ``PageImage``; the scheduler wraps them in ``PageRequest`` for an
engine; engines answer with ``EngineOutput``; the scheduler turns those into ``PageResult`` and,
once every page of a document is accounted for, a ``DocResult``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class PageStatus(str, enum.Enum):
    """Final status of one page. Every page of every document ends with exactly one."""

    OK = "ok"
    BLANK = "blank"
    RETRIED_OK = "retried_ok"  # a retry (higher temperature) produced acceptable output
    LARGE_OK = "large_ok"  # the Large-mode second phase produced acceptable output
    ROI_IMPROVED = "roi_improved"  # the ROI pass replaced one or more regions
    FALLBACK_TEXT = "fallback_text_layer"  # OCR failed; the PDF's own text layer was used
    FAILED = "failed"  # OCR failed and there was no text layer: a stub was written
    TOO_LARGE = "too_large"  # the page would render above the pixel cap
    RENDER_TIMEOUT = "render_timeout"  # rendering exceeded the per-page time limit
    RENDER_ERROR = "render_error"  # the renderer raised or its worker died (memory limit, crash)

    @property
    def is_failure(self) -> bool:
        return self in _FAILURES


_FAILURES = {
    PageStatus.FAILED,
    PageStatus.TOO_LARGE,
    PageStatus.RENDER_TIMEOUT,
    PageStatus.RENDER_ERROR,
}


@dataclass(frozen=True)
class PageImage:
    """One rendered page, as produced by a render worker."""

    doc_key: str  # unique id of the input document within the run
    page_index: int  # 0-based
    width: int  # pixels
    height: int
    mode: str  # PIL mode of ``pixels`` ("RGB")
    # raw pixel bytes, row-major; empty when the engine needs no image. A read-only memoryview of
    # shared memory when the page came through /dev/shm (runner/shm.py): no copy; pickled as bytes
    pixels: bytes | memoryview
    dpi: float
    page_width_pt: float
    page_height_pt: float
    render_seconds: float
    blank: bool
    blank_reason: str
    text_layer: str  # plain text of the PDF's own text layer ("" when none)
    text_markdown: str | None = None  # Markdown of the text layer (only for the text engine)
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific worker output

    def to_pil(self) -> Any:
        from PIL import Image

        return Image.frombytes(self.mode, (self.width, self.height), self.pixels)

    def __getstate__(self) -> dict[str, Any]:
        # a memoryview does not pickle: send the bytes (to a render worker, to Ray, ...)
        state = dict(self.__dict__)
        if isinstance(state["pixels"], memoryview):
            state["pixels"] = state["pixels"].tobytes()
        return state


@dataclass(frozen=True)
class PageRequest:
    """One generation request: a page plus how to read it this time."""

    request_id: str  # unique per attempt
    image: PageImage
    prompt_mode: str  # "clean" | "grounded"
    attempt: int = 0  # 0 = first try
    temperature: float = 0.0
    resolution: str | None = None  # None = the engine's configured resolution
    image_override: Any = None  # a PIL image to read instead of ``image`` (ROI crops)


@dataclass(frozen=True)
class EngineOutput:
    """What an engine returns for one ``PageRequest``."""

    request_id: str
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error" | None when unknown
    stopped_by_eos: bool | None = None  # None when the engine cannot tell (text layer)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    seconds: float = 0.0
    error: str | None = None  # set when the engine failed on this request


@dataclass(frozen=True)
class Attempt:
    """One engine attempt at a page, kept on the page record."""

    attempt: int
    temperature: float
    resolution: str | None
    finish_reason: str | None
    stopped_by_eos: bool | None
    output_tokens: int | None
    seconds: float
    degenerate: str | None  # why the output was judged degenerate, None if acceptable
    error: str | None = None


@dataclass(frozen=True)
class PageResult:
    """Final record of one page (one line of ``<stem>.pages.jsonl``)."""

    page: int  # 1-based page number
    status: PageStatus
    engine: str
    markdown: str  # cleaned Markdown for this page (what goes into <stem>.md)
    raw_text: str  # the raw engine text of the accepted attempt ("" when none)
    seconds: float  # engine seconds summed over attempts
    render_seconds: float
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    stopped_by_eos: bool | None = None
    attempts: tuple[Attempt, ...] = ()
    error: str | None = None
    counters: dict[str, int] = field(default_factory=dict)
    regions: tuple[dict[str, Any], ...] = ()  # grounded regions (label, box_pt, text)
    notes: tuple[str, ...] = ()

    def to_json(self, *, with_regions: bool = False) -> dict[str, Any]:
        """One ``<stem>.pages.jsonl`` record; ``with_regions`` for grounded output."""
        rec = {
            "page": self.page,
            "status": self.status.value,
            "engine": self.engine,
            "seconds": round(self.seconds, 4),
            "render_seconds": round(self.render_seconds, 4),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reason,
            "stopped_by_eos": self.stopped_by_eos,
            "attempts": [a.__dict__ for a in self.attempts],
            "error": self.error,
            "counters": dict(self.counters),
            "notes": list(self.notes),
            "raw_text": self.raw_text,
            "markdown": self.markdown,
        }
        if with_regions:
            rec["regions"] = list(self.regions)
        return rec


@dataclass(frozen=True)
class DocResult:
    """Outcome of one input document."""

    doc_key: str
    source: str  # input path or URI as given
    output_stem: str  # output path relative to the output root, without suffix
    status: str  # "ok" | "failed" | "skipped"
    pages: tuple[PageResult, ...] = ()
    error: str | None = None
    seconds: float = 0.0
    num_pages: int = 0
