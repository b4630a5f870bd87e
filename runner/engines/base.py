"""The engine protocol: submit page requests, poll finished outputs.

Every engine (text layer, vLLM, Transformers, and the deterministic fake in the tests) implements
this narrow interface. The scheduler owns ordering, retries and writing; an engine only turns
``PageRequest`` into ``EngineOutput``.

Streaming engines (vLLM) accept work continuously and return outputs as they finish; simple
engines subclass ``BatchEngine`` and process their queue in ``poll``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from runner.records import EngineOutput, PageRequest


class EngineUnavailable(RuntimeError):
    """The engine cannot run on this machine; the message says what to install or use instead."""


class EngineDied(RuntimeError):
    """The engine failed as a whole (CUDA OOM, engine process killed); in-flight work is lost."""


@runtime_checkable
class Engine(Protocol):
    name: str
    #: what the render workers must produce for this engine
    needs_pixels: bool
    needs_text_markdown: bool

    def start(self) -> None:
        """Load the model. Slow; called once, outside the timed part of a run."""

    def submit(self, requests: Sequence[PageRequest]) -> None:
        """Queue requests. Must not block on generation."""

    def poll(self, timeout: float = 0.0) -> list[EngineOutput]:
        """Return outputs finished so far (waiting up to ``timeout`` seconds for at least one).

        Raises ``EngineDied`` when the engine as a whole failed; the caller restarts it and
        resubmits whatever it had in flight.
        """

    def pending(self) -> int:
        """Requests submitted but not yet returned by ``poll``."""

    def restart(self) -> None:
        """Drop in-flight work and bring the engine back after ``EngineDied``."""

    def close(self) -> None: ...


class BatchEngine:
    """Base for engines that process a batch synchronously inside ``poll``."""

    name = "batch"
    needs_pixels = True
    needs_text_markdown = False
    max_batch = 8

    def __init__(self) -> None:
        self._queue: deque[PageRequest] = deque()

    def start(self) -> None:
        return None

    def submit(self, requests: Sequence[PageRequest]) -> None:
        self._queue.extend(requests)

    def pending(self) -> int:
        return len(self._queue)

    def poll(self, timeout: float = 0.0) -> list[EngineOutput]:
        if not self._queue:
            if timeout > 0:
                time.sleep(min(timeout, 0.01))
            return []
        batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        return self.generate_batch(batch)

    def generate_batch(self, batch: list[PageRequest]) -> list[EngineOutput]:
        raise NotImplementedError

    def restart(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._queue.clear()
