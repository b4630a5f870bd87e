"""Render stage on Ray: ``OpenTask`` / ``RenderTask`` → ``TaskResult`` as Ray tasks on CPU workers.

Same interface as ``runner.render.RenderPool`` (``submit``, ``collect``, ``busy``, ``wait_ready``,
``close``, ``restarts``), so ``runner.pipeline.Pipeline`` drives it unchanged. Each task runs
``runner.render.run_task`` (the function the local worker loop runs) in a Ray worker process that
keeps its own small cache of open documents.

- At most ``workers`` tasks are in Ray at once (the pipeline's window bounds the queue as well).
  A task's deadline is its time limit plus a start-up grace, counted from when it is handed to
  Ray: Ray may start a fresh worker process for it (imports take seconds), which the local pool
  never bills to a page. A task past its deadline is cancelled with ``force=True`` (its worker
  process is killed) and reported as ``timeout`` with the configured limit in the message.
- A task whose worker died (killed, OOM, node lost) is resubmitted up to ``max_retries`` times,
  then reported as ``crash``. Ray's own task retries are off so every retry is counted here.
- The PDF is read by the worker from the driver's path when it runs on the driver's node, else
  from a copy of the file's bytes the pool put into the object store once per document.
- With ``pixels_in_store`` the page pixels and the engine hook's output stay in the object store:
  the driver gets a ``PageImage`` with empty ``pixels`` and an ``ObjectRef`` under
  ``extra[HEAVY_KEY]``, which ``RayEngine`` hands straight to an engine actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.records import PageImage
from runner.render import OpenTask, RenderTask, TaskResult

HEAVY_KEY = "ray_heavy"  # PageImage.extra key: ObjectRef of (pixels, hook output)
_DOC_REFS = 8  # documents whose bytes the driver keeps in the object store (the pipeline opens 2 ahead)


# --------------------------------------------------------------------------------------------
# Worker side (runs inside Ray worker processes)
# --------------------------------------------------------------------------------------------


@dataclass
class _WorkerState:
    cache: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)
    copies: OrderedDict[str, str] = field(default_factory=OrderedDict)  # driver path -> local copy


_STATE: _WorkerState | None = None


def _worker_state(mem_limit_mb: int) -> _WorkerState:
    global _STATE
    if _STATE is None:
        from runner.render import prepare_worker

        prepare_worker(mem_limit_mb)
        _remove_dead_copies()
        _STATE = _WorkerState()
    return _STATE


def _copies_dir() -> Path:
    return Path(tempfile.gettempdir()) / "pdf-ocr-ray"


def _remove_dead_copies() -> None:
    """Local PDF copies left by worker processes that were killed (their name starts with the pid)."""
    folder = _copies_dir()
    if not folder.is_dir():
        return
    for f in folder.glob("*.pdf"):
        pid = f.name.split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(OSError):
            f.unlink()


def _local_copy(st: _WorkerState, path: str, doc_box: list[Any]) -> str:
    """A file on this node holding the driver's ``path`` (fetched from the object store once)."""
    import ray

    local = st.copies.get(path)
    if local is not None and os.path.exists(local):
        st.copies.move_to_end(path)
        return local
    folder = _copies_dir()
    folder.mkdir(parents=True, exist_ok=True)
    local = str(folder / f"{os.getpid()}-{hashlib.sha1(path.encode()).hexdigest()[:16]}.pdf")
    Path(local).write_bytes(ray.get(doc_box[0]))
    st.copies[path] = local
    while len(st.copies) > 4:
        _, old = st.copies.popitem(last=False)
        doc = st.cache.pop(old, None)
        if doc is not None:
            with contextlib.suppress(Exception):
                doc.close()
        with contextlib.suppress(OSError):
            os.unlink(old)
    return local


def _run_remote(
    task: OpenTask | RenderTask, doc_box: list[Any], driver_node: str, mem_limit_mb: int, split_heavy: bool
) -> Any:
    """Body of the Ray task. Returns a ``TaskResult``, or ``(TaskResult, heavy)`` with ``split_heavy``."""
    import ray

    st = _worker_state(mem_limit_mb)
    run = task
    if doc_box and ray.get_runtime_context().get_node_id() != driver_node:
        run = dataclasses.replace(task, path=_local_copy(st, task.path, doc_box))
    from runner.render import run_task

    res = run_task(run, st.cache, st.hooks, mem_limit_mb)
    res = dataclasses.replace(res, task=task)
    if not split_heavy:
        return res
    img = res.payload
    if not isinstance(img, PageImage) or not img.pixels:
        return res, None
    heavy = (img.pixels, img.extra.get("hook"))
    light = dataclasses.replace(img, pixels=b"", extra={k: v for k, v in img.extra.items() if k != "hook"})
    return dataclasses.replace(res, payload=light), heavy


def _warm(mem_limit_mb: int) -> int:
    _worker_state(mem_limit_mb)
    time.sleep(0.05)  # hold the slot briefly so the warm-up tasks land on distinct workers
    return os.getpid()


_REMOTE: dict[str, Any] = {}


def _remote(name: str) -> Any:
    """Ray remote functions, created on first use (``import ray`` stays out of module import)."""
    fn = _REMOTE.get(name)
    if fn is None:
        import ray

        # max_retries=0: a dead worker is retried by the pool itself, which counts it.
        fn = _REMOTE[name] = ray.remote(num_cpus=1, max_retries=0)(_run_remote if name == "render" else _warm)
    return fn


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


@dataclass
class _Running:
    task: OpenTask | RenderTask
    attempt: int
    started: float
    deadline: float
    heavy_ref: Any = None


@dataclass
class RayRenderPool:
    """Render tasks on a Ray cluster with deadlines, worker-death retries and a cap on tasks in Ray."""

    workers: int = 2
    render_timeout_s: float = 60.0
    open_timeout_s: float = 60.0
    mem_limit_mb: int = 4096
    max_retries: int = 2
    pixels_in_store: bool = False
    ship_documents: bool = True  # False only when every node sees the driver's paths (one node, shared FS)
    task_options: dict[str, Any] = field(default_factory=dict)  # extra ``.options()`` (resources, strategy)
    restarts: int = 0  # worker processes lost (killed at a deadline or died)
    retried: int = 0  # tasks resubmitted after their worker died
    max_in_ray: int = 0  # the most tasks that were in Ray at once (observability and tests)
    startup_grace_s: float = 5.0  # added to each deadline; raised to the measured warm-up time
    _queue: deque[tuple[OpenTask | RenderTask, int]] = field(default_factory=deque)
    _running: dict[Any, _Running] = field(default_factory=dict)
    _done: list[TaskResult] = field(default_factory=list)
    _docs: OrderedDict[str, Any] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        import ray

        if self.workers < 1:
            raise ValueError("RayRenderPool needs at least one worker slot")
        self._driver_node = ray.get_runtime_context().get_node_id()
        # Worker processes boot now, while the engine actors load the model (the pipeline makes its
        # pool before it starts the engine), as the local pool's do; ``wait_ready`` only collects
        # them. Booted at ``wait_ready`` instead, 28 workers cost ~10 s after the engines were
        # ready on the two-GPU machine (GPU session 10).
        self._warm_t0 = time.monotonic()
        warm = _remote("warm").options(name="pdf_render_warmup", **self.task_options)
        self._warm_refs: list[Any] = [warm.remote(self.mem_limit_mb) for _ in range(self.workers)]
        self._warm_done: list[float] = []  # when each warm-up finished: the boot time behind the grace
        for ref in self._warm_refs:
            ref.future().add_done_callback(lambda _f: self._warm_done.append(time.monotonic()))

    # -- interface of runner.render.RenderPool -------------------------------------------------
    def submit(self, task: OpenTask | RenderTask) -> None:
        self._queue.append((task, 0))

    def busy(self) -> int:
        return len(self._queue) + len(self._running)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the warm-up started at construction (``workers`` worker processes), so their
        start-up is not billed to a page."""
        import ray

        refs, self._warm_refs = self._warm_refs, []
        if not refs:
            return
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        # The slowest worker's boot, not the time since construction (that includes the engine's
        # start-up); a warm-up still pending or not yet called back counts until now.
        complete = not pending and len(self._warm_done) >= len(refs)
        done_at = max(self._warm_done) if complete else time.monotonic()
        self.startup_grace_s = max(self.startup_grace_s, done_at - self._warm_t0)
        for r in pending:
            ray.cancel(r, force=True)
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(ready)

    def collect(self, timeout: float = 0.0) -> list[TaskResult]:
        """Finished tasks; waits up to ``timeout`` seconds for at least one."""
        import ray

        self._dispatch()
        if self._running and not self._done:
            now = time.monotonic()
            wait_s = max(0.0, min([timeout, *[r.deadline - now for r in self._running.values()]]))
            refs = list(self._running)
            ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                self._finish(ref)
        now = time.monotonic()
        for ref, run in list(self._running.items()):
            if now > run.deadline:
                del self._running[ref]
                ray.cancel(ref, force=True)  # kills the worker process: MuPDF may be stuck in C code
                self.restarts += 1
                limit = self._limit(run.task)
                self._done.append(
                    TaskResult(run.task, "timeout", None, f"timed out after {limit:g} s", now - run.started)
                )
        self._dispatch()
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        import ray

        for ref in [*self._running, *self._warm_refs]:
            with contextlib.suppress(ray.exceptions.RayError, ValueError):
                ray.cancel(ref, force=True)
        self._warm_refs = []
        self._running.clear()
        self._queue.clear()
        self._docs.clear()

    def __enter__(self) -> RayRenderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _limit(self, task: OpenTask | RenderTask) -> float:
        return self.open_timeout_s if isinstance(task, OpenTask) else self.render_timeout_s

    def _doc_box(self, path: str) -> list[Any]:
        """``[ObjectRef]`` of the document's bytes (nested in a list so Ray does not fetch it for
        workers that already have the file open), or ``[]`` when documents are not shipped."""
        import ray

        if not self.ship_documents:
            return []
        ref = self._docs.get(path)
        if ref is None:
            try:
                ref = ray.put(Path(path).read_bytes())
            except OSError:
                return []  # the worker reports the error when it opens the path itself
            self._docs[path] = ref
            while len(self._docs) > _DOC_REFS:
                self._docs.popitem(last=False)
        else:
            self._docs.move_to_end(path)
        return [ref]

    def _dispatch(self) -> None:
        fn = _remote("render")
        while self._queue and len(self._running) < self.workers:
            task, attempt = self._queue.popleft()
            split = self.pixels_in_store and isinstance(task, RenderTask) and task.want_pixels
            opts = {"name": "pdf_render", **self.task_options}
            if split:
                opts["num_returns"] = 2
            refs = fn.options(**opts).remote(
                task, self._doc_box(task.path), self._driver_node, self.mem_limit_mb, split
            )
            now = time.monotonic()
            if split:
                ref, heavy = refs
            else:
                ref, heavy = refs, None
            deadline = now + self._limit(task) + self.startup_grace_s
            self._running[ref] = _Running(task, attempt, now, deadline, heavy)
            self.max_in_ray = max(self.max_in_ray, len(self._running))

    def _finish(self, ref: Any) -> None:
        import ray

        run = self._running.pop(ref)
        try:
            res: TaskResult = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # a bug in the task wrapper, not a worker death
            msg = f"{type(e.cause).__name__}: {e.cause}" if e.cause is not None else str(e)
            self._done.append(TaskResult(run.task, "error", None, msg[:500], time.monotonic() - run.started))
            return
        except ray.exceptions.TaskCancelledError:
            return
        except ray.exceptions.RayError as e:  # worker or node died, object lost, OOM-killed
            self.restarts += 1
            if run.attempt < self.max_retries:
                self.retried += 1
                self._queue.appendleft((run.task, run.attempt + 1))
                return
            self._done.append(
                TaskResult(
                    run.task,
                    "crash",
                    None,
                    f"render worker died {run.attempt + 1} time(s): {type(e).__name__}",
                    time.monotonic() - run.started,
                )
            )
            return
        img = res.payload
        if run.heavy_ref is not None and isinstance(img, PageImage) and not img.pixels and not img.blank:
            extra = {**img.extra, HEAVY_KEY: run.heavy_ref}
            res = dataclasses.replace(res, payload=dataclasses.replace(img, extra=extra))
        self._done.append(res)
