"""Render stage: PDF pages → ``PageImage`` in isolated worker processes.

Every PDF operation (opening, counting pages, rendering, text extraction) runs in a pool of
``spawn``-started worker processes. The parent never parses a PDF itself, so a hostile file can
at worst take down one worker: each task has a time limit (the worker is killed and replaced when
it is exceeded) and each worker a memory limit (``RLIMIT_DATA``). Pages that would render above a
pixel cap are refused before any pixel is allocated.

In: ``OpenTask`` / ``RenderTask``. Out: ``TaskResult`` with a dict payload (open) or a
``PageImage`` (render), or a failure kind: ``error``, ``timeout``, ``crash``, ``too_large``,
``password``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from runner import shm
from runner.blank import detect_blank
from runner.records import PageImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenTask:
    task_id: int
    doc_key: str
    path: str
    password: str | None = None


@dataclass(frozen=True)
class RenderTask:
    task_id: int
    doc_key: str
    path: str
    page_index: int
    dpi: float
    password: str | None = None
    want_pixels: bool = True
    want_markdown: bool = False
    want_table_check: bool = False
    max_pixels: int = 40_000_000
    blank_ink_threshold: float = 2e-5
    hook: tuple[str, dict[str, Any]] | None = None
    scale: float = 1.0  # extra zoom on top of dpi (ROI pass renders sharper)
    clip: tuple[float, float, float, float] | None = None  # PDF points, for ROI crops


@dataclass(frozen=True)
class TaskResult:
    task: OpenTask | RenderTask
    kind: str  # "ok" | "error" | "timeout" | "crash" | "too_large" | "password"
    payload: Any = None  # dict for OpenTask, PageImage for RenderTask
    message: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class _NeedsPassword(Exception):
    pass


def _open_doc(cache: dict[str, Any], path: str, password: str | None) -> Any:
    import pymupdf

    doc = cache.get(path)
    if doc is not None:
        return doc
    doc = pymupdf.open(path, filetype="pdf")
    if doc.needs_pass:
        if not password or not doc.authenticate(password):
            doc.close()
            raise _NeedsPassword("encrypted PDF: " + ("wrong password" if password else "needs --password"))
    while len(cache) >= 4:  # small LRU: workers see pages of a few documents at a time
        old = cache.pop(next(iter(cache)))
        with contextlib.suppress(Exception):
            old.close()
    cache[path] = doc
    return doc


def _do_open(cache: dict[str, Any], t: OpenTask) -> dict[str, Any]:
    doc = _open_doc(cache, t.path, t.password)
    n = doc.page_count
    return {
        "page_count": n,
        "repaired": bool(getattr(doc, "is_repaired", False)),
        "encrypted": bool(doc.is_encrypted) or bool(doc.metadata and doc.metadata.get("encryption")),
    }


def _do_render(cache: dict[str, Any], t: RenderTask, hook_fn: Any) -> PageImage:
    import pymupdf

    t0 = time.perf_counter()
    doc = _open_doc(cache, t.path, t.password)
    page = doc.load_page(t.page_index)
    rect = page.rect if t.clip is None else pymupdf.Rect(*t.clip)
    zoom = t.dpi / 72.0 * t.scale
    w, h = round(rect.width * zoom), round(rect.height * zoom)
    if w <= 0 or h <= 0:
        raise ValueError(f"page has an empty size ({rect.width:.1f}x{rect.height:.1f} pt)")
    if w * h > t.max_pixels:
        raise _TooLarge(
            f"page would render to {w}x{h} = {w * h / 1e6:.0f} MP at {t.dpi:g} dpi "
            f"(cap {t.max_pixels / 1e6:.0f} MP; page is {rect.width / 72:.0f}x{rect.height / 72:.0f} in)"
        )
    text = page.get_text("text") if t.clip is None else ""
    pix = None
    if t.want_pixels:
        pix = page.get_pixmap(
            matrix=pymupdf.Matrix(zoom, zoom), alpha=False, clip=t.clip, colorspace=pymupdf.csRGB
        )
    blank, reason = (
        (False, "clip") if t.clip is not None else detect_blank(page, pix, text, t.blank_ink_threshold)
    )
    markdown = None
    if t.want_markdown and not blank:
        markdown = _page_markdown(doc, t.page_index)
    extra: dict[str, Any] = {}
    if t.clip is not None:
        extra["clip"] = tuple(round(v, 2) for v in t.clip)
    if t.want_table_check and not blank:
        extra["has_table"] = _has_table(page)
    pixels = pix.samples if pix is not None else b""
    if hook_fn is not None and pix is not None and not blank:
        from PIL import Image

        img = Image.frombytes("RGB", (pix.width, pix.height), pixels)
        assert t.hook is not None
        extra["hook"] = hook_fn(img, **t.hook[1])
    return PageImage(
        doc_key=t.doc_key,
        page_index=t.page_index,
        width=pix.width if pix is not None else w,
        height=pix.height if pix is not None else h,
        mode="RGB",
        pixels=bytes(pixels),
        dpi=t.dpi * t.scale,
        page_width_pt=rect.width,
        page_height_pt=rect.height,
        render_seconds=time.perf_counter() - t0,
        blank=blank,
        blank_reason=reason,
        text_layer=text,
        text_markdown=markdown,
        extra=extra,
    )


def _page_markdown(doc: Any, index: int) -> str:
    import pymupdf4llm

    # pymupdf4llm 2.x defaults to its layout-model mode: ~1 s/page on a CPU core and it tries to
    # OCR image-only pages. The classic mode gives the same Markdown on born-digital pages we
    # measured (headings, pipe tables) at ~0.08 s/page, and never OCRs: that is the engines' job.
    if hasattr(pymupdf4llm, "use_layout"):
        pymupdf4llm.use_layout(False)
    return str(pymupdf4llm.to_markdown(doc, pages=[index], show_progress=False))


def _has_table(page: Any) -> bool:
    """Born-digital evidence that a page shows a table: ruling lines.

    Three or more horizontal rules of the same horizontal extent (≥ 60 pt wide) — the top, middle
    and bottom rules of a booktabs table, or the row borders of a gridded one. Bars of a chart or
    underlines do not line up that way. PyMuPDF's ``find_tables`` is more thorough but measured
    1.5 s/page here; this costs milliseconds.
    """
    groups: dict[tuple[int, int], set[int]] = {}
    try:
        drawings = page.get_cdrawings()
    except Exception:  # evidence only: never a reason to fail a page
        return False
    for d in drawings:
        for item in d.get("items", ()):
            op = item[0]
            if op == "l":
                (x0, y0), (x1, y1) = (item[1][0], item[1][1]), (item[2][0], item[2][1])
                segs = [(x0, y0, x1, y1)]
            elif op == "re":
                r = item[1]
                segs = [(r[0], r[1], r[2], r[1]), (r[0], r[3], r[2], r[3])]
            else:
                continue
            for sx0, sy0, sx1, sy1 in segs:
                if abs(sy1 - sy0) < 1.0 and abs(sx1 - sx0) >= 60:
                    key = (round(min(sx0, sx1) / 2), round(max(sx0, sx1) / 2))
                    groups.setdefault(key, set()).add(round(sy0))
    return any(len(ys) >= 3 for ys in groups.values())


def prepare_worker(mem_limit_mb: int) -> None:
    """Once per worker process, before its first task: memory limit, quiet MuPDF, imports."""
    if mem_limit_mb > 0:
        import resource

        lim = mem_limit_mb * 1024 * 1024
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pymupdf

    # MuPDF prints warnings about damaged files to stderr; they are reported per file instead.
    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)


#: Niceness added to each local render worker (``RUNNER_RENDER_NICE``; 0 keeps the parent's).
RENDER_NICE_ENV = "RUNNER_RENDER_NICE"
DEFAULT_RENDER_NICE = 10


def lower_priority() -> int | None:
    """Render workers run behind the processes that feed the GPU. They render ahead of the engine
    (a whole queued batch), so at a run's start they can take every core: on the H100 host, 24
    render workers of two engines kept all 16 cores busy for the first 15-20 s while vLLM's engine
    cores, whose prefill steps are host-bound (Python launching the vision encoder), waited for a
    core and the GPU idled 30-45% (GPU session 13). With a lower priority they take what the
    engine cores leave. Returns the new niceness, or None when unchanged."""
    try:
        n = int(os.environ.get(RENDER_NICE_ENV, str(DEFAULT_RENDER_NICE)))
    except ValueError:
        n = DEFAULT_RENDER_NICE
    if n <= 0 or not hasattr(os, "nice"):
        return None
    try:
        return os.nice(n)
    except OSError:
        return None


def _worker_main(conn: Connection, mem_limit_mb: int, use_shm: bool = False) -> None:
    lower_priority()
    prepare_worker(mem_limit_mb)
    shm.set_owner(os.getppid())
    cache: dict[str, Any] = {}
    hooks: dict[str, Any] = {}
    conn.send("ready")  # start-up (imports) must not count against the first task's time limit
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        result = run_task(task, cache, hooks, mem_limit_mb)
        # Results go back as bytes; with shared memory their large buffers travel by name only.
        try:
            conn.send_bytes(shm.dumps(result) if use_shm else pickle.dumps(result, pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError):  # the main process is gone: leave nothing behind
            shm.discard_last()
            return


def run_task(
    task: OpenTask | RenderTask, cache: dict[str, Any], hook_fns: dict[str, Any], mem_limit_mb: int = 0
) -> TaskResult:
    """Run one task in the current (worker) process; never raises for a per-file failure.

    ``cache`` holds open documents and ``hook_fns`` imported hooks across calls; both belong to the
    calling worker. Shared by the local worker loop and the Ray executor's render tasks.
    """
    t0 = time.perf_counter()
    try:
        if isinstance(task, OpenTask):
            payload: Any = _do_open(cache, task)
        else:
            hook_fn = None
            if task.hook is not None:
                hook_fn = hook_fns.get(task.hook[0])
                if hook_fn is None:
                    mod, _, fn = task.hook[0].partition(":")
                    hook_fn = hook_fns[task.hook[0]] = getattr(importlib.import_module(mod), fn)
            payload = _do_render(cache, task, hook_fn)
        return TaskResult(task, "ok", payload, "", time.perf_counter() - t0)
    except _TooLarge as e:
        return TaskResult(task, "too_large", None, str(e), time.perf_counter() - t0)
    except _NeedsPassword as e:
        return TaskResult(task, "password", None, str(e), time.perf_counter() - t0)
    except MemoryError:
        return TaskResult(
            task, "error", None, f"out of memory (worker limit {mem_limit_mb} MB)", time.perf_counter() - t0
        )
    except Exception as e:  # any parser failure is a per-file/per-page error, reported upstream
        msg = f"{type(e).__name__}: {e}".strip()
        # A failing document may be left in a bad state; reopen it next time.
        doc = cache.pop(task.path, None)
        if doc is not None:
            with contextlib.suppress(Exception):
                doc.close()
        return TaskResult(task, "error", None, msg[:500], time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    task: OpenTask | RenderTask | None = None
    started: float = 0.0
    deadline: float = 0.0
    ready: bool = False


@dataclass
class RenderPool:
    """A pool of render worker processes with per-task deadlines and crash recovery."""

    workers: int = 2
    render_timeout_s: float = 60.0
    open_timeout_s: float = 60.0
    mem_limit_mb: int = 4096
    _pool: list[_Worker] = field(default_factory=list)
    _queue: deque[OpenTask | RenderTask] = field(default_factory=deque)
    _done: list[TaskResult] = field(default_factory=list)
    restarts: int = 0
    broken: str = ""  # set when workers cannot start at all: every task then fails as "crash"
    _start_failures: int = 0

    def __post_init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._shm = shm.available()
        if self._shm:
            shm.cleanup_stale()
        for _ in range(self.workers):
            self._pool.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self.mem_limit_mb, self._shm), daemon=True, name="pdf-render"
        )
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _replace(self, w: _Worker) -> None:
        with contextlib.suppress(Exception):
            w.proc.kill()
        w.proc.join(timeout=5)
        if self._shm and w.proc.pid is not None:
            shm.cleanup(os.getpid(), w.proc.pid)  # what it wrote for a result nobody received
        with contextlib.suppress(Exception):
            w.conn.close()
        self.restarts += 1
        nw = self._spawn()
        w.proc, w.conn, w.task, w.ready = nw.proc, nw.conn, None, False

    def submit(self, task: OpenTask | RenderTask) -> None:
        self._queue.append(task)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker finished starting (so start-up is not billed to a page)."""
        end = time.monotonic() + timeout
        while not all(w.ready for w in self._pool) and time.monotonic() < end and not self.broken:
            wait([w.conn for w in self._pool if not w.ready], timeout=0.1)
            self._check_ready()

    def busy(self) -> int:
        return len(self._queue) + sum(1 for w in self._pool if w.task is not None)

    def _check_ready(self) -> None:
        for w in self._pool:
            if not w.ready:
                try:
                    if w.conn.poll():
                        w.ready = w.conn.recv() == "ready"
                        if w.ready:
                            self._start_failures = 0
                except (EOFError, OSError):
                    # Died while starting (broken environment, memory limit below what the imports
                    # need). Retry a few times, then give up loudly instead of looping forever.
                    self._start_failures += 1
                    if self._start_failures >= MAX_START_FAILURES:
                        self.broken = (
                            f"render workers die while starting ({self._start_failures} times in a row; "
                            f"memory limit {self.mem_limit_mb} MB too low?)"
                        )
                    self._replace(w)

    def _dispatch(self) -> None:
        self._check_ready()
        if self.broken:
            while self._queue:
                self._done.append(TaskResult(self._queue.popleft(), "crash", None, self.broken))
            return
        for w in self._pool:
            if w.ready and w.task is None and self._queue:
                task = self._queue.popleft()
                limit = self.open_timeout_s if isinstance(task, OpenTask) else self.render_timeout_s
                try:
                    w.conn.send(task)
                except (BrokenPipeError, OSError):
                    # The idle worker died; its replacement is not ready yet: the task waits.
                    self._queue.appendleft(task)
                    self._replace(w)
                    continue
                w.task, w.started, w.deadline = task, time.monotonic(), time.monotonic() + limit

    def collect(self, timeout: float = 0.0) -> list[TaskResult]:
        """Finished tasks; waits up to ``timeout`` seconds for at least one."""
        self._dispatch()
        busy = [w for w in self._pool if w.task is not None]
        starting = [w for w in self._pool if not w.ready] if self._queue else []
        if (busy or starting) and not self._done:
            now = time.monotonic()
            wait_s = max(0.0, min([timeout, *[w.deadline - now for w in busy]]))
            wait([w.conn for w in busy + starting], timeout=wait_s)
        for w in self._pool:
            if w.task is None:
                continue
            task = w.task
            if w.conn.poll():
                try:
                    res = shm.loads(w.conn.recv_bytes())
                except (EOFError, OSError, pickle.UnpicklingError, ValueError):
                    code = w.proc.exitcode
                    self._done.append(
                        TaskResult(
                            task,
                            "crash",
                            None,
                            _crash_message(code, self.mem_limit_mb),
                            time.monotonic() - w.started,
                        )
                    )
                    self._replace(w)
                    continue
                w.task = None
                if not isinstance(res, TaskResult):  # never expected: keep the pipe protocol honest
                    res = TaskResult(task, "crash", None, f"render worker sent {type(res).__name__}")
                self._done.append(res)
            elif not w.proc.is_alive():
                self._done.append(
                    TaskResult(
                        task,
                        "crash",
                        None,
                        _crash_message(w.proc.exitcode, self.mem_limit_mb),
                        time.monotonic() - w.started,
                    )
                )
                self._replace(w)
            elif time.monotonic() > w.deadline:
                limit = self.open_timeout_s if isinstance(task, OpenTask) else self.render_timeout_s
                self._done.append(
                    TaskResult(
                        task, "timeout", None, f"timed out after {limit:g} s", time.monotonic() - w.started
                    )
                )
                self._replace(w)
        self._dispatch()
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        for w in self._pool:
            with contextlib.suppress(Exception):
                w.conn.send(None)
        for w in self._pool:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=2)
            with contextlib.suppress(Exception):
                w.conn.close()
        self._pool.clear()
        if self._shm:
            shm.cleanup(os.getpid())

    def __enter__(self) -> RenderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MAX_START_FAILURES = 5


def _crash_message(code: int | None, mem_limit_mb: int) -> str:
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"render worker died ({name}); memory limit {mem_limit_mb} MB"
    return f"render worker exited with code {code} (memory limit {mem_limit_mb} MB)"
