"""A deterministic fake engine for CPU tests (never part of the product).

It answers each page the way DeepSeek-OCR's grounded prompt would, from the page's own text
layer, so outputs are checkable. Knobs inject what real engines do on bad days: loops on chosen
pages/attempts, per-request errors, hostile HTML, slowness, and whole-engine deaths.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from runner.engines.base import EngineDied
from runner.records import EngineOutput, PageRequest

EOS = "<｜end▁of▁sentence｜>"


def loop_text(seed: int = 0) -> str:
    block = "<|ref|>text<|/ref|><|det|>[[100, 100, 900, 140]]<|/det|>\nThe same line again and again.\n\n"
    return block * 120  # no EOS: cut at max_tokens


@dataclass(frozen=True)
class Seen:
    doc: str
    page_index: int
    attempt: int
    temperature: float
    prompt_mode: str
    resolution: str | None = None
    hook: object = None  # what the render workers' hook returned for this page


@dataclass
class FakeEngine:
    name: str = "fake"
    needs_pixels: bool = True
    needs_text_markdown: bool = False
    check_degenerate: bool = True
    large_resolution: str | None = "large"
    resolution: str | None = "gundam"
    worker_hook: tuple[str, dict] | None = None
    supports_request_resolution: bool = False  # True: Large requests go to this engine (like vLLM's)
    # fault injection
    loop_pages: dict[tuple[str, int], int] = field(
        default_factory=dict
    )  # (doc_key suffix, page_index) -> attempts that loop
    loop_all_attempts_in_base: set[tuple[str, int]] = field(default_factory=set)  # loop unless Large mode
    hostile: bool = False
    figure: bool = False  # add an ``image`` region (a figure box) to every page
    delay_s: float = 0.0
    die_after_outputs: int | None = None  # raise EngineDied once after this many outputs
    lose_once: int | None = None  # silently drop the Nth request (a stalled engine), once
    submit_dies_once: int | None = None  # submit() raises EngineDied at the Nth submitted request
    restart_fails: bool = False  # restart() itself raises (e.g. CUDA OOM while reloading)
    max_batch: int = 8
    # bookkeeping for assertions
    seen: list[Seen] = field(default_factory=list)  # light records: holding requests would hold pixels
    started: int = 0
    restarts: int = 0
    _queue: deque[PageRequest] = field(default_factory=deque)
    _outputs: int = 0

    def start(self) -> None:
        self.started += 1

    def submit(self, requests: Sequence[PageRequest]) -> None:
        if self.submit_dies_once is not None and len(self.seen) >= self.submit_dies_once:
            self.submit_dies_once = None
            raise EngineDied("injected: engine found dead on submit")
        self._queue.extend(requests)
        self.seen.extend(
            Seen(
                os.path.basename(r.image.doc_key),
                r.image.page_index,
                r.attempt,
                r.temperature,
                r.prompt_mode,
                r.resolution,
                r.image.extra.get("hook"),
            )
            for r in requests
        )

    def hook_for(self, resolution: str | None) -> tuple[str, dict] | None:
        if self.worker_hook is None:
            return None
        return (self.worker_hook[0], {**self.worker_hook[1], "res": resolution})

    def pending(self) -> int:
        return len(self._queue)

    def restart(self) -> None:
        self.restarts += 1
        self._queue.clear()
        if self.restart_fails:
            raise RuntimeError("injected: CUDA out of memory while reloading")

    def close(self) -> None:
        self._queue.clear()

    def _key(self, req: PageRequest) -> tuple[str, int]:
        return (os.path.basename(req.image.doc_key), req.image.page_index)

    def _answer(self, req: PageRequest) -> str:
        key = self._key(req)
        if req.prompt_mode in ("roi", "markdown"):  # ROI crops: plain reading of the region
            return (
                f"Sharper reading of a region of page {req.image.page_index + 1} "
                f"({req.image.width}x{req.image.height} px), with more words: alpha beta gamma delta "
                f"epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau.{EOS}"
            )
        if key in self.loop_all_attempts_in_base and (req.resolution or self.resolution) != "large":
            return loop_text()
        if req.attempt < self.loop_pages.get(key, 0):
            return loop_text()
        text = req.image.text_layer.strip() or f"page {req.image.page_index + 1} image text"
        body = "\n".join(line for line in text.splitlines() if line.strip())
        out = f"<|ref|>text<|/ref|><|det|>[[50, 50, 950, 950]]<|/det|>\n{body}\n\n"
        if self.figure:
            out += "<|ref|>image<|/ref|><|det|>[[100, 500, 600, 800]]<|/det|>\n\n"
        if self.hostile:
            out += (
                "<|ref|>text<|/ref|><|det|>[[50, 960, 950, 990]]<|/det|>\n"
                "<script>alert('x')</script><img src=x onerror=alert(1)> [click](javascript:alert(1)) "
                "<iframe src='http://evil'></iframe><style>body{}</style>\n\n"
            )
        return out + EOS

    def poll(self, timeout: float = 0.0) -> list[EngineOutput]:
        if not self._queue:
            if timeout:
                time.sleep(min(timeout, 0.005))
            return []
        if self.die_after_outputs is not None and self._outputs >= self.die_after_outputs:
            self.die_after_outputs = None
            raise EngineDied("injected engine death")
        outs = []
        for _ in range(min(self.max_batch, len(self._queue))):
            req = self._queue.popleft()
            if self.lose_once is not None and self._outputs == self.lose_once:
                self.lose_once = None
                self._outputs += 1
                continue  # never answered, and pending() no longer counts it
            if self.delay_s:
                time.sleep(self.delay_s)
            text = self._answer(req)
            looped = EOS not in text
            outs.append(
                EngineOutput(
                    request_id=req.request_id,
                    text=text,
                    finish_reason="length" if looped else "stop",
                    stopped_by_eos=not looped,
                    prompt_tokens=912,
                    output_tokens=len(text) // 4,
                    seconds=self.delay_s,
                )
            )
            self._outputs += 1
        return outs


class FakeFactory:
    """Engine factory for ``Pipeline``: a fresh FakeEngine per call, configured alike; keeps them."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs
        self.engines: list[FakeEngine] = []

    def __call__(self, config: object) -> FakeEngine:
        eng = FakeEngine(**self.kwargs)  # type: ignore[arg-type]
        res = getattr(getattr(config, "engine_config", None), "resolution", None)
        if res:
            eng.resolution = res
        self.engines.append(eng)
        return eng
