"""Progress display: a rich progress bar on a terminal, plain periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("runner")


class Progress:
    def __init__(self, total_files: int, style: str = "auto", log_every_s: float = 10.0) -> None:
        if style == "auto":
            style = "bar" if sys.stderr.isatty() else "log"
        self.style = style
        self.total_files = total_files
        self.files_done = 0
        self.files_failed = 0
        self.pages_total = 0
        self.pages_done = 0
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        self.log_every_s = log_every_s
        self._bar: Any = None
        if style == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._files = self._bar.add_task("files", total=total_files, rate="")
            self._pages = self._bar.add_task("pages", total=0, rate="")
            self._bar.start()

    def _rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.pages_done / dt if dt > 0 else 0.0

    def doc_started(self, source: str) -> None:
        log.debug("start %s", source)

    def doc_skipped(self) -> None:
        self.files_done += 1
        if self._bar is not None:
            self._bar.update(self._files, advance=1)

    def doc_done(self, ok: bool) -> None:
        self.files_done += 1
        self.files_failed += 0 if ok else 1
        if self._bar is not None:
            self._bar.update(
                self._files, advance=1, rate=f"{self.files_failed} failed" if self.files_failed else ""
            )

    def add_pages(self, n: int) -> None:
        self.pages_total += n
        if self._bar is not None:
            self._bar.update(self._pages, total=self.pages_total)

    def page_done(self, status: str) -> None:
        self.pages_done += 1
        if self._bar is not None:
            self._bar.update(self._pages, advance=1, rate=f"{self._rate():.2f} pages/s")

    def tick(self, pages_done: int) -> None:
        now = time.perf_counter()
        if self.style == "log" and now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info(
                "progress: files %d/%d, pages %d/%d, %.2f pages/s",
                self.files_done,
                self.total_files,
                self.pages_done,
                self.pages_total,
                self._rate(),
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
