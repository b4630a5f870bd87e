"""Schedule stage: documents → rendered pages → engine → cleaned pages → written documents.

One loop drives everything with a bounded window of pages in flight (rendering + engine), so host
memory does not grow with document length:

1. activate documents in order (open them in a render worker to learn the page count);
2. keep the render pool fed with page tasks until ``batch_pages`` pages are in flight;
3. blank pages and render failures get their final record at once; other pages go to the engine;
4. poll the engine; a degenerate or failed output is retried at the next temperature, joining the
   running stream of work; accepted output is cleaned (``postprocess``) into the page record;
5. a document whose pages all have records is written (Markdown, page records, regions, done
   marker last, every file atomically) and its memory released.

Pages that still fail after the retries, and pages that miss a required label the page visibly
has, wait for a second phase that reuses one Large-mode engine for the whole run. Anything still
failing falls back to the PDF's text layer or a ``[[OCR failed: …]]`` stub: no page is dropped.
If the engine dies, it is restarted a bounded number of times and the in-flight pages are resent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner import stacksample
from runner.config import RunConfig
from runner.engines.base import Engine, EngineDied
from runner.jsonsafe import safe_dumps
from runner.naming import InputDoc
from runner.progress import Progress
from runner.records import Attempt, DocResult, EngineOutput, PageImage, PageRequest, PageResult, PageStatus
from runner.render import OpenTask, RenderPool, RenderTask, TaskResult
from runner.storage import Storage

log = logging.getLogger("runner")

ROI_SCALE = 2.0  # crops are rendered at twice the page DPI
ROI_MARGIN_PT = 4.0
ROI_MAX_REGIONS = 24  # per page: a newspaper page of 137 tiny boxes must not explode the pass
OUTPUT_SUFFIXES = (".md", ".pages.jsonl", ".regions.jsonl", ".done", ".review.html")
BLANK_STUB = "[[Blank page]]"


class FatalEngineError(RuntimeError):
    """The engine died more often than ``--engine-restarts`` allows."""


@dataclass
class _PageWork:
    doc_key: str
    index: int
    phase: str = "main"  # "main" | "large"
    image: PageImage | None = None
    attempts: list[Attempt] = field(default_factory=list)
    seconds: float = 0.0
    render_seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)
    provisional: PageResult | None = None  # accepted result awaiting the Large or ROI phase
    large_reason: str = ""
    # ROI pass: a parent page holds its accepted raw text and the crops' readings
    roi_geometry: Any = None  # PageGeometry of the accepted reading (the page image is released)
    roi_regions: list[Any] = field(default_factory=list)  # parsed regions of the accepted reading
    roi_readings: dict[int, str | None] = field(default_factory=dict)
    roi_pending: int = 0
    # ROI pass: a crop job points at its parent page and region
    roi_parent: _PageWork | None = None
    roi_index: int = -1
    clip: tuple[float, float, float, float] | None = None


@dataclass
class _DocState:
    doc: InputDoc
    stack: contextlib.ExitStack
    local_path: str = ""
    page_count: int | None = None
    todo: int = 0
    next_page: int = 0
    results: dict[int, PageResult] = field(default_factory=dict)
    waiting_large: dict[int, _PageWork] = field(default_factory=dict)
    waiting_roi: dict[int, _PageWork] = field(default_factory=dict)
    regions: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    notes: list[str] = field(default_factory=list)
    input_open: bool = True  # False while parked pages wait for a later phase

    @property
    def complete(self) -> bool:
        return self.page_count is not None and len(self.results) == self.todo


@dataclass
class RunStats:
    started_wall: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    pages_done: int = 0
    engine_pages: int = 0
    loop_pages: int = 0
    retries_attempted: int = 0
    retries_improved: int = 0
    large_pass: int = 0
    large_improved: int = 0
    roi_improved: int = 0
    engine_restarts: int = 0
    resubmitted: int = 0
    render_worker_restarts: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    render_seconds: float = 0.0
    engine_startup_s: float = 0.0


class Pipeline:
    def __init__(
        self,
        config: RunConfig,
        engine_factory: Callable[[RunConfig], Engine],
        inputs: Storage,
        outputs: Storage,
        progress: Progress,
        pool_factory: Callable[[RunConfig], RenderPool] | None = None,
    ) -> None:
        self.cfg = config
        self.pool_factory = pool_factory or _local_pool
        self.engine_factory = engine_factory
        self.inputs = inputs
        self.outputs = outputs
        self.progress = progress
        self.stats = RunStats()
        self.doc_results: list[DocResult] = []
        self._task_ids = 0
        self._req_ids = 0
        self._request_resolution: str | None = None
        self.fatal_engine_error: str | None = None

    # ---------------------------------------------------------------- public
    def run(self, docs: list[InputDoc], engine: Engine | None = None) -> list[DocResult]:
        """Process ``docs``; ``engine`` (built but not started) is used for the main phase."""
        todo: list[InputDoc] = []
        for d in docs:
            if not self.cfg.force and self.outputs.exists(d.output_stem + ".done"):
                log.info("skip (done marker exists): %s", self.inputs.uri(d.rel))
                self.doc_results.append(
                    DocResult(d.doc_key, self.inputs.uri(d.rel), d.output_stem, "skipped")
                )
                self.progress.doc_skipped()
            else:
                todo.append(d)
        if not todo:
            return self.doc_results
        engine = engine or self.engine_factory(self.cfg)
        # Render workers boot while the model loads; neither counts towards throughput.
        pool = self.pool_factory(self.cfg)
        t_start = time.perf_counter()
        try:
            engine.start()
        except BaseException:
            pool.close()
            raise
        self.stats.engine_startup_s = time.perf_counter() - t_start
        if self.stats.engine_startup_s > 1:
            log.info("engine %s started in %.1f s", engine.name, self.stats.engine_startup_s)
        pool.wait_ready()
        self.stats.t0 = time.perf_counter()
        self.progress.t0 = self.stats.t0  # pages/s on the bar excludes start-up, like the summary
        stacksample.start_from_env()  # diagnostics (RUNNER_STACK_SAMPLE), off by default
        self._states: dict[str, _DocState] = {}
        try:
            self._pending_docs: deque[InputDoc] = deque(todo)
            engine = self._drive(engine, pool, phase="main")
            self._reacquire_inputs()
            waiting = [w for st in self._states.values() for w in st.waiting_large.values()]
            if waiting:
                engine = self._large_phase(engine, pool, waiting)
            self._reacquire_inputs()
            roi = [w for st in self._states.values() for w in st.waiting_roi.values()]
            if roi:
                engine = self._roi_phase(engine, pool, roi)
            self._account_for_everything()
        except FatalEngineError as e:
            log.error("%s", e)
            self.fatal_engine_error = str(e)
            self._fail_open(f"engine failed: {e}")
        except Exception as e:  # a bug must cost the open documents, not the run's records
            log.exception("internal error; open documents are recorded as failed")
            self._fail_open(f"internal error: {type(e).__name__}: {e}")
        finally:
            self.stats.render_worker_restarts = pool.restarts
            pool.close()
            with contextlib.suppress(Exception):
                engine.close()
        return self.doc_results

    # ---------------------------------------------------------------- main loop
    def _next_id(self) -> int:
        self._task_ids += 1
        return self._task_ids

    def _drive(
        self, engine: Engine, pool: RenderPool, phase: str, jobs: deque[_PageWork] | None = None
    ) -> Engine:
        """Run the render → engine loop until every scheduled page has a record (or waits for Large)."""
        cfg = self.cfg
        render_jobs: deque[_PageWork] = jobs if jobs is not None else deque()
        rendering: dict[int, _PageWork] = {}
        opening: dict[int, _DocState] = {}
        in_engine: dict[str, tuple[_PageWork, PageRequest]] = {}
        hook = getattr(engine, "worker_hook", None)
        hook_for = getattr(engine, "hook_for", None)
        if phase == "large" and self._request_resolution and hook_for is not None:
            # Same engine, Large resolution per request: the render workers prepare the Large
            # view too, instead of the engine redoing it from pixels in its feeding thread.
            hook = hook_for(self._request_resolution)
        want_table = bool(cfg.required_labels) and getattr(engine, "large_resolution", None) is not None
        last_tick = 0.0
        last_output = time.monotonic()

        def in_flight() -> int:
            return len(rendering) + len(in_engine)

        while True:
            # 1. activate documents (main phase): keep a few open ahead of the renderer
            if phase == "main":
                while self._pending_docs and len(opening) + self._n_active_unscheduled() < 2:
                    d = self._pending_docs.popleft()
                    st = self._activate(d)
                    if st is not None:
                        t = OpenTask(self._next_id(), d.doc_key, st.local_path, cfg.password)
                        opening[t.task_id] = st
                        pool.submit(t)
                # schedule pages of opened documents, in document order
                for st in self._states.values():
                    while (
                        st.page_count is not None
                        and st.next_page < st.todo
                        and len(render_jobs) < cfg.batch_pages
                    ):
                        render_jobs.append(_PageWork(st.doc.doc_key, st.next_page, phase))
                        st.next_page += 1
            # 2. feed the render pool within the window
            while render_jobs and in_flight() < cfg.batch_pages:
                w = render_jobs.popleft()
                st = self._states[w.doc_key]
                rt = RenderTask(
                    task_id=self._next_id(),
                    doc_key=w.doc_key,
                    path=st.local_path,
                    page_index=w.index,
                    dpi=cfg.dpi,
                    password=cfg.password,
                    want_pixels=engine.needs_pixels or cfg.assets != "none",
                    want_markdown=engine.needs_text_markdown,
                    want_table_check=want_table and phase == "main",
                    max_pixels=cfg.max_page_pixels,
                    blank_ink_threshold=cfg.blank_ink_threshold,
                    hook=hook if engine.needs_pixels and w.phase != "roi" else None,
                    scale=ROI_SCALE if w.phase == "roi" else 1.0,
                    clip=w.clip,
                )
                rendering[rt.task_id] = w
                pool.submit(rt)
            # 3. collect rendered pages and opened documents
            busy_engine = engine.pending() > 0
            for res in pool.collect(timeout=0.0 if busy_engine else 0.05):
                if isinstance(res.task, OpenTask):
                    self._on_opened(opening.pop(res.task.task_id), res)
                    continue
                w = rendering.pop(res.task.task_id)
                req = self._on_rendered(w, res)
                if req is not None:
                    if not in_engine:  # the stall clock starts when the engine has work
                        last_output = time.monotonic()
                    in_engine[req.request_id] = (w, req)
                    engine = self._submit(engine, req, in_engine)
            # 4. poll the engine whenever we wait for an answer: an engine's own ``pending()``
            #    count is never trusted to decide whether a page can still come back.
            if in_engine or engine.pending() > 0:
                try:
                    # a short wait, not 0: with both stages busy a zero timeout spins a core
                    # that the render workers need
                    outputs = engine.poll(timeout=0.002 if rendering or render_jobs else 0.02)
                    if outputs or not in_engine:
                        last_output = time.monotonic()
                    elif time.monotonic() - last_output > cfg.engine_stall_timeout_s:
                        raise EngineDied(
                            f"no page came back for {cfg.engine_stall_timeout_s:g} s with "
                            f"{len(in_engine)} in flight (engine reports {engine.pending()} pending)"
                        )
                except EngineDied as e:
                    engine = self._restart_engine(engine, e, in_engine)
                    last_output = time.monotonic()
                    outputs = []
                for out in outputs:
                    item = in_engine.pop(out.request_id, None)
                    if item is None:  # an answer for a request resent after a restart: ignore
                        continue
                    w, req = item
                    retry = self._on_output(w, req, out, engine)
                    if retry is not None:
                        in_engine[retry.request_id] = (w, retry)
                        engine = self._submit(engine, retry, in_engine)
            # 5. write finished documents; a document whose pages are all settled or parked for a
            #    later phase releases its input (an S3 download) until that phase
            for st in [
                s for s in self._states.values() if s.complete and not s.waiting_large and not s.waiting_roi
            ]:
                self._finish_doc(st)
            if phase == "main":
                for st in self._states.values():
                    parked = len(st.waiting_large) + len(st.waiting_roi)
                    if (
                        st.input_open
                        and parked
                        and st.page_count is not None
                        and (len(st.results) + parked == st.todo)
                    ):
                        st.stack.close()
                        st.input_open = False
            now = time.perf_counter()
            if now - last_tick >= 1.0:
                last_tick = now
                self.stats.timeline.append((round(now - self.stats.t0, 2), self.stats.pages_done))
                self.progress.tick(self.stats.pages_done)
            if not (render_jobs or rendering or in_engine or opening or self._pending_docs):
                if phase == "main" and any(
                    s.page_count is not None and s.next_page < s.todo for s in self._states.values()
                ):
                    continue
                break
        self.stats.timeline.append((round(time.perf_counter() - self.stats.t0, 2), self.stats.pages_done))
        return engine

    def _reacquire_inputs(self) -> None:
        """Reopen the inputs of documents parked for a later phase; if one cannot be had again,
        its parked pages keep their earlier reading (or fall back) instead of waiting forever."""
        for st in list(self._states.values()):
            if st.input_open:
                continue
            st.stack = contextlib.ExitStack()
            try:
                st.local_path = st.stack.enter_context(self.inputs.local_path(st.doc.rel))
                st.input_open = True
            except Exception as e:  # storage errors are per-document
                why = f"input unavailable for the second phase: {type(e).__name__}: {e}"
                log.error("%s: %s", self.inputs.uri(st.doc.rel), why)
                for w in [*st.waiting_large.values(), *st.waiting_roi.values()]:
                    self._page_done(w, w.provisional or self._fallback(w, why, None))

    def _fail_open(self, why: str) -> None:
        for st in list(self._states.values()):
            self._fail_doc(st, why)
        for d in self._pending_docs:
            self._record_failed(d, f"not processed: {why}")
        self._pending_docs.clear()

    def _account_for_everything(self) -> None:
        """Safety net: a document still open after the last phase gets a record for every page
        (a scheduler bug must show up as failed pages, never as a silently missing document)."""
        for st in list(self._states.values()):
            for i in range(st.todo):
                if i not in st.results:
                    log.error(
                        "internal error: %s page %d has no result; recorded as failed", st.doc.doc_key, i + 1
                    )
                    st.results[i] = PageResult(
                        page=i + 1,
                        status=PageStatus.FAILED,
                        engine=self._engine_name,
                        markdown="[[OCR failed: internal error]]",
                        raw_text="",
                        seconds=0.0,
                        render_seconds=0.0,
                        error="internal error: page was never settled",
                    )
            st.waiting_large.clear()
            st.waiting_roi.clear()
            self._finish_doc(st)

    def _n_active_unscheduled(self) -> int:
        return sum(1 for s in self._states.values() if s.page_count is None or s.next_page < s.todo)

    # ---------------------------------------------------------------- documents
    def _activate(self, d: InputDoc) -> _DocState | None:
        stack = contextlib.ExitStack()
        try:
            local = stack.enter_context(self.inputs.local_path(d.rel))
        except Exception as e:
            stack.close()
            self._record_failed(d, f"cannot read input: {type(e).__name__}: {e}")
            return None
        self.outputs.cleanup_partial(d.output_stem, OUTPUT_SUFFIXES)
        st = _DocState(doc=d, stack=stack, local_path=local)
        self._states[d.doc_key] = st
        self.progress.doc_started(self.inputs.uri(d.rel))
        return st

    def _on_opened(self, st: _DocState, res: TaskResult) -> None:
        src = self.inputs.uri(st.doc.rel)
        if res.kind != "ok":
            kind = {"password": "encrypted", "timeout": "open timeout", "crash": "open crashed"}.get(
                res.kind, ""
            )
            msg = f"{kind}: {res.message}" if kind and kind not in res.message else res.message
            self._fail_doc(st, f"cannot open PDF: {msg}")
            return
        n = int(res.payload["page_count"])
        if res.payload.get("repaired"):
            st.notes.append("damaged file repaired by PyMuPDF")
            log.warning("%s: damaged file, repaired", src)
        if n == 0:
            self._fail_doc(st, "PDF has zero pages")
            return
        st.page_count = n
        st.todo = min(n, self.cfg.max_pages) if self.cfg.max_pages else n
        self.progress.add_pages(st.todo)

    def _fail_doc(self, st: _DocState, error: str) -> None:
        self._states.pop(st.doc.doc_key, None)
        st.stack.close()
        self._record_failed(
            st.doc, error, seconds=time.perf_counter() - st.started, num_pages=st.page_count or 0
        )

    def _record_failed(self, d: InputDoc, error: str, seconds: float = 0.0, num_pages: int = 0) -> None:
        src = self.inputs.uri(d.rel)
        log.error("FAILED %s: %s", src, error)
        # One Markdown file per input, even for a PDF that could not be read: a stub that says
        # why (no done marker, so a rerun tries again). Never replaces real earlier output.
        try:
            if not self.outputs.exists(d.output_stem + ".md") or self.cfg.force:
                stub = f"[[Document not converted: {html.escape(error)}]]\n"
                self.outputs.write_bytes(d.output_stem + ".md", stub.encode("utf-8"))
            self.outputs.delete(d.output_stem + ".done")
        except Exception as e:  # the failure is already recorded; a stub is best effort
            log.warning("%s: could not write the failure stub: %s", src, e)
        self.doc_results.append(
            DocResult(
                d.doc_key, src, d.output_stem, "failed", error=error, seconds=seconds, num_pages=num_pages
            )
        )
        self.progress.doc_done(ok=False)

    # ---------------------------------------------------------------- pages
    def _page_done(self, w: _PageWork, result: PageResult) -> None:
        st = self._states[w.doc_key]
        st.waiting_large.pop(w.index, None)
        st.waiting_roi.pop(w.index, None)
        st.results[w.index] = result
        self.stats.pages_done += 1
        self.progress.page_done(result.status.value)

    def _on_rendered(self, w: _PageWork, res: TaskResult) -> PageRequest | None:
        cfg = self.cfg
        if res.kind != "ok":
            status = {
                "too_large": PageStatus.TOO_LARGE,
                "timeout": PageStatus.RENDER_TIMEOUT,
            }.get(res.kind, PageStatus.RENDER_ERROR)
            src = self.inputs.uri(self._states[w.doc_key].doc.rel)
            if w.phase == "roi":
                self._roi_reading(w, None, f"crop not rendered: {res.message}")
                return None
            log.error("%s page %d: %s: %s", src, w.index + 1, status.value, res.message)
            if w.phase == "large" and w.provisional is not None:
                self._page_done(w, w.provisional)
                return None
            self._page_done(
                w,
                PageResult(
                    page=w.index + 1,
                    status=status,
                    engine="render",
                    markdown=f"[[Page not rendered: {status.value}]]",
                    raw_text="",
                    seconds=0.0,
                    render_seconds=res.seconds,
                    error=res.message,
                ),
            )
            return None
        img: PageImage = res.payload
        self.stats.render_seconds += img.render_seconds
        if w.phase == "roi":
            w.image = img
            assert w.roi_parent is not None
            label = w.roi_parent.roi_regions[w.roi_index].label
            self._req_ids += 1
            return PageRequest(
                request_id=f"roi-{self._req_ids}",
                image=img,
                prompt_mode="markdown" if label == "table" else "roi",
            )
        log.debug("rendered %s p%d in %.3f s", w.doc_key, w.index + 1, img.render_seconds)
        if img.blank and w.phase != "roi":
            self._page_done(
                w,
                PageResult(
                    page=w.index + 1,
                    status=PageStatus.BLANK,
                    engine="blank-detector",
                    markdown=BLANK_STUB,
                    raw_text="",
                    seconds=0.0,
                    render_seconds=img.render_seconds,
                    notes=(img.blank_reason,),
                ),
            )
            return None
        w.image = img
        w.render_seconds = img.render_seconds
        attempt = len(w.attempts)
        temps = (0.0, *cfg.retry_temperatures)
        temp = temps[min(attempt, len(temps) - 1)] if w.phase == "main" else 0.0
        return self._request(w, attempt, temp)

    def _request(self, w: _PageWork, attempt: int, temperature: float) -> PageRequest:
        self._req_ids += 1
        assert w.image is not None
        return PageRequest(
            request_id=f"{w.phase}-{self._req_ids}",
            image=w.image,
            prompt_mode=self.cfg.mode,
            attempt=attempt,
            temperature=temperature,
            resolution=self._request_resolution if w.phase == "large" else None,
        )

    def _on_output(
        self, w: _PageWork, req: PageRequest, out: EngineOutput, engine: Engine
    ) -> PageRequest | None:
        """Judge one engine output. Returns a retry request, or None when the page is settled."""
        from postprocess import detect_degenerate

        cfg = self.cfg
        if w.phase == "roi":
            bad = out.error or detect_degenerate(out.text, stopped_by_eos=out.stopped_by_eos)
            self._roi_reading(w, None if bad else out.text, bad or "", out.seconds)
            return None
        w.seconds += out.seconds
        reason: str | None
        if out.error:
            reason = f"error: {out.error}"
        elif getattr(engine, "check_degenerate", True):
            reason = detect_degenerate(out.text, stopped_by_eos=out.stopped_by_eos)
        else:
            reason = None
        w.attempts.append(
            Attempt(
                attempt=req.attempt,
                temperature=req.temperature,
                resolution=req.resolution or getattr(engine, "resolution", None),
                finish_reason=out.finish_reason,
                stopped_by_eos=out.stopped_by_eos,
                output_tokens=out.output_tokens,
                seconds=round(out.seconds, 4),
                degenerate=reason,
                error=out.error,
            )
        )
        if req.attempt == 0 and w.phase == "main":
            self.stats.engine_pages += 1
            if reason is not None and not out.error:
                self.stats.loop_pages += 1
        if reason is None:
            cleaned = self._clean(w, out.text)
            if w.phase == "large":
                self._settle_large(w, out, cleaned)
                return None
            status = PageStatus.OK if req.attempt == 0 else PageStatus.RETRIED_OK
            if req.attempt > 0:
                self.stats.retries_improved += 1
            result = self._result(w, status, out, cleaned)
            missing = self._missing_required(w, cleaned, engine)
            if missing:
                w.provisional = result
                if self._queue_large(w, f"missing required label {missing!r}", engine):
                    return None
            self._accept(w, result, out)
            return None
        w.reasons.append(reason)
        if w.phase == "main" and out.error is None and len(w.attempts) <= len(cfg.retry_temperatures):
            temp = cfg.retry_temperatures[len(w.attempts) - 1]
            self.stats.retries_attempted += 1
            log.info(
                "retry %s p%d (attempt %d, T=%.2f): %s", w.doc_key, w.index + 1, len(w.attempts), temp, reason
            )
            return self._request(w, len(w.attempts), temp)
        if w.phase == "main" and self._queue_large(w, reason, engine):
            return None
        self._page_done(w, self._fallback(w, reason, out))
        return None

    def _clean(self, w: _PageWork, raw: str) -> Any:
        from postprocess import CleanOptions, clean_page

        img = w.image
        assert img is not None
        geom = _geometry(img)
        link = self._figure_linker(w) if self.cfg.assets != "none" and img.pixels else None
        return clean_page(
            raw,
            options=CleanOptions(mode=self.cfg.mode, table_format=self.cfg.table_format),
            geometry=geom,
            figure_link=link,
        )

    def _figure_linker(self, w: _PageWork) -> Callable[[int, tuple[int, int, int, int]], str | None]:
        st = self._states[w.doc_key]
        stem = st.doc.output_stem
        img = w.image
        assert img is not None

        def link(i: int, box: tuple[int, int, int, int]) -> str | None:
            import io

            x1, y1, x2, y2 = (max(0, v) for v in box)
            x2, y2 = min(x2, img.width), min(y2, img.height)
            if x2 - x1 < 4 or y2 - y1 < 4:
                return None
            name = f"p{w.index + 1:04d}_fig{i + 1:02d}.png"
            try:
                buf = io.BytesIO()
                img.to_pil().crop((x1, y1, x2, y2)).save(buf, format="PNG")
                self.outputs.write_bytes(f"{stem}_assets/{name}", buf.getvalue())
            except Exception as e:  # no crop: the Markdown gets the figure marker instead
                log.warning("%s_assets/%s: figure not saved: %s", stem, name, e)
                return None
            return f"{stem.rsplit('/', 1)[-1]}_assets/{name}"

        return link

    def _result(self, w: _PageWork, status: PageStatus, out: EngineOutput | None, cleaned: Any) -> PageResult:
        regions: tuple[dict[str, Any], ...] = ()
        if self.cfg.mode == "grounded":
            regions = _region_records(cleaned.regions)
        if self.cfg.assets == "pages" and w.image is not None and w.image.pixels:
            import io

            rel = f"{self._states[w.doc_key].doc.output_stem}_assets/p{w.index + 1:04d}.png"
            try:
                buf = io.BytesIO()
                w.image.to_pil().save(buf, format="PNG")
                self.outputs.write_bytes(rel, buf.getvalue())
            except Exception as e:  # an asset is a by-product: the page text still counts
                log.warning("%s: page image not saved: %s", rel, e)
        return PageResult(
            page=w.index + 1,
            status=status,
            engine=self._engine_name,
            markdown=cleaned.markdown,
            raw_text=out.text if out else "",
            seconds=w.seconds,
            render_seconds=w.render_seconds,
            prompt_tokens=out.prompt_tokens if out else None,
            output_tokens=sum(a.output_tokens or 0 for a in w.attempts)
            or (out.output_tokens if out else None),
            finish_reason=out.finish_reason if out else None,
            stopped_by_eos=out.stopped_by_eos if out else None,
            attempts=tuple(w.attempts),
            counters=dict(cleaned.counters),
            regions=regions,
            notes=tuple(cleaned.problems),
        )

    @property
    def _engine_name(self) -> str:
        return self.cfg.engine

    def _missing_required(self, w: _PageWork, cleaned: Any, engine: Engine) -> str | None:
        if w.phase != "main" or getattr(engine, "large_resolution", None) is None or w.image is None:
            return None
        if "table" in self.cfg.required_labels and w.image.extra.get("has_table"):
            if not any(r.label == "table" for r in cleaned.regions) and "<table" not in cleaned.markdown:
                return "table"
        return None

    def _queue_large(self, w: _PageWork, reason: str, engine: Engine) -> bool:
        """Park a page for the Large-mode phase; False when that phase is off, full or unsupported."""
        if not self.cfg.retry_large or self.stats.large_pass >= self.cfg.retry_large_cap:
            return False
        if getattr(engine, "large_resolution", None) is None:
            return False
        self.stats.large_pass += 1
        w.large_reason = reason
        w.image = None  # re-rendered in the Large phase; do not hold pixels meanwhile
        self._states[w.doc_key].waiting_large[w.index] = w
        return True

    def _settle_large(self, w: _PageWork, out: EngineOutput, cleaned: Any) -> None:
        prov = w.provisional
        if prov is not None and w.large_reason.startswith("missing required label"):
            if any(r.label == "table" for r in cleaned.regions) or "<table" in cleaned.markdown:
                self.stats.large_improved += 1
                self._accept(w, self._result(w, PageStatus.LARGE_OK, out, cleaned), out)
            else:
                self._accept(
                    w,
                    dataclasses.replace(prov, notes=(*prov.notes, "large pass did not find the label")),
                    None,
                )
            return None
        self.stats.large_improved += 1
        self._accept(w, self._result(w, PageStatus.LARGE_OK, out, cleaned), out)
        return None

    # ---------------------------------------------------------------- ROI pass
    def _accept(self, w: _PageWork, result: PageResult, out: EngineOutput | None) -> None:
        """Settle an accepted page, or park it for the ROI pass when it has regions to re-read."""
        if self.cfg.roi_pass and self.cfg.mode == "grounded" and out is not None and w.image is not None:
            from postprocess import parse_grounding

            geom = _geometry(w.image)
            regions, _ = parse_grounding(out.text, geom)
            picks = [
                i for i, r in enumerate(regions) if r.tagged and r.label in self.cfg.roi_labels and r.boxes_pt
            ][:ROI_MAX_REGIONS]
            if picks:
                w.provisional, w.roi_geometry = result, geom
                w.roi_regions, w.roi_pending = regions, len(picks)
                w.roi_readings = {i: None for i in picks}
                w.image = None  # crops are rendered afresh at ROI_SCALE; do not hold the page
                self._states[w.doc_key].waiting_roi[w.index] = w
                return
        self._page_done(w, result)

    def _roi_phase(self, engine: Engine, pool: RenderPool, parents: list[_PageWork]) -> Engine:
        jobs: deque[_PageWork] = deque()
        for p in parents:
            for i in p.roi_readings:
                r = p.roi_regions[i]
                x0 = min(b[0] for b in r.boxes_pt) - ROI_MARGIN_PT
                y0 = min(b[1] for b in r.boxes_pt) - ROI_MARGIN_PT
                x1 = max(b[2] for b in r.boxes_pt) + ROI_MARGIN_PT
                y1 = max(b[3] for b in r.boxes_pt) + ROI_MARGIN_PT
                jobs.append(
                    _PageWork(
                        p.doc_key,
                        p.index,
                        "roi",
                        roi_parent=p,
                        roi_index=i,
                        clip=(max(0.0, x0), max(0.0, y0), x1, y1),
                    )
                )
        log.info("ROI pass: %d region(s) on %d page(s)", len(jobs), len(parents))
        return self._drive(engine, pool, phase="roi", jobs=jobs)

    def _roi_reading(self, job: _PageWork, text: str | None, why: str, seconds: float = 0.0) -> None:
        parent = job.roi_parent
        assert parent is not None
        parent.roi_readings[job.roi_index] = text
        parent.seconds += seconds
        if why:
            parent.reasons.append(f"roi region {job.roi_index}: {why}")
        parent.roi_pending -= 1
        if parent.roi_pending == 0:
            self._roi_merge(parent)

    def _roi_merge(self, w: _PageWork) -> None:
        """Put the better reading of each re-read region back in reading order and re-clean."""
        from postprocess import CleanOptions, clean_page, strip_special_tokens

        prov = w.provisional
        assert prov is not None
        replaced: list[str] = []
        parts: list[str] = []
        for i, r in enumerate(w.roi_regions):
            text = r.text
            new = w.roi_readings.get(i)
            if new is not None:
                new = strip_special_tokens(new).strip()
                old_len, new_len = len(r.text.strip()), len(new)
                # A sharper crop that reads more (but not wildly more: that smells of a loop the
                # guard did not catch) is better; an empty original is always worse.
                if new and (old_len == 0 or old_len < new_len <= 3 * max(old_len, 40)):
                    replaced.append(f"roi: region {i} ({r.label}) replaced: {old_len} -> {new_len} chars")
                    text = new
            if r.tagged:
                boxes = ", ".join(f"[{', '.join(str(v) for v in b)}]" for b in r.boxes)
                parts.append(f"<|ref|>{r.label}<|/ref|><|det|>[{boxes}]<|/det|>\n{text}\n")
            else:
                parts.append(f"{text}\n")
        st = self._states[w.doc_key]
        if not replaced:
            self._page_done(w, dataclasses.replace(prov, notes=(*prov.notes, "roi: no region improved")))
            return
        raw = "\n".join(parts)
        cleaned = clean_page(
            raw,
            options=CleanOptions(mode=self.cfg.mode, table_format=self.cfg.table_format),
            geometry=w.roi_geometry,
        )
        regions = _region_records(cleaned.regions)
        self.stats.roi_improved += 1
        log.info("%s page %d: ROI pass replaced %d region(s)", st.doc.doc_key, w.index + 1, len(replaced))
        self._page_done(
            w,
            dataclasses.replace(
                prov,
                status=PageStatus.ROI_IMPROVED,
                markdown=cleaned.markdown,
                raw_text=raw,
                seconds=w.seconds,
                counters=dict(cleaned.counters),
                regions=regions,
                notes=(*prov.notes, *replaced),
            ),
        )

    def _fallback(self, w: _PageWork, reason: str, out: EngineOutput | None) -> PageResult:
        from postprocess import CleanOptions, clean_page

        if w.provisional is not None:
            return w.provisional
        text = w.image.text_layer.strip() if w.image is not None else ""
        if text:
            cleaned = clean_page(text, options=CleanOptions(mode="clean", table_format=self.cfg.table_format))
            status, md = PageStatus.FALLBACK_TEXT, cleaned.markdown
            counters = dict(cleaned.counters)
        else:
            status, md, counters = PageStatus.FAILED, f"[[OCR failed: {html.escape(reason)}]]", {}
        src = self.inputs.uri(self._states[w.doc_key].doc.rel)
        log.warning(
            "%s page %d: %s after %d attempt(s): %s", src, w.index + 1, status.value, len(w.attempts), reason
        )
        return PageResult(
            page=w.index + 1,
            status=status,
            engine=self._engine_name,
            markdown=md,
            raw_text=out.text if out else "",
            seconds=w.seconds,
            render_seconds=w.render_seconds,
            output_tokens=sum(a.output_tokens or 0 for a in w.attempts) or None,
            finish_reason=out.finish_reason if out else None,
            stopped_by_eos=out.stopped_by_eos if out else None,
            attempts=tuple(w.attempts),
            error=reason,
            counters=counters,
            notes=tuple(w.reasons),
        )

    def _large_phase(self, engine: Engine, pool: RenderPool, waiting: list[_PageWork]) -> Engine:
        large_res = getattr(engine, "large_resolution", None)
        log.info("Large-mode pass: %d page(s) at resolution %s", len(waiting), large_res)
        jobs: deque[_PageWork] = deque()
        for w in waiting:
            w.phase = "large"
            jobs.append(w)
        if getattr(engine, "supports_request_resolution", False):
            # The engine takes the resolution per request: no second engine, no second start-up.
            self._request_resolution = large_res
            try:
                return self._drive(engine, pool, phase="large", jobs=jobs)
            finally:
                self._request_resolution = None
        # vLLM's stock processor has a process-global resolution: one Large engine for the run.
        with contextlib.suppress(Exception):
            engine.close()
        ec = dataclasses.replace(self.cfg.engine_config, resolution=large_res)
        large_cfg = dataclasses.replace(self.cfg, engine_config=ec)
        large = self.engine_factory(large_cfg)
        try:
            t = time.perf_counter()
            large.start()
            self.stats.engine_startup_s += time.perf_counter() - t
            return self._drive(large, pool, phase="large", jobs=jobs)
        except BaseException:
            with contextlib.suppress(Exception):
                large.close()
            raise

    def _submit(
        self, engine: Engine, req: PageRequest, in_engine: dict[str, tuple[_PageWork, PageRequest]]
    ) -> Engine:
        """Submit one request; an engine that turns out dead is restarted (and gets it resent)."""
        try:
            engine.submit([req])
        except EngineDied as e:  # the protocol says only poll raises; be safe with any engine
            engine = self._restart_engine(engine, e, in_engine)
        return engine

    def _restart_engine(
        self, engine: Engine, err: Exception, in_engine: dict[str, tuple[_PageWork, PageRequest]]
    ) -> Engine:
        self.stats.engine_restarts += 1
        if self.stats.engine_restarts > self.cfg.engine_restarts:
            raise FatalEngineError(f"engine died {self.stats.engine_restarts} times; last error: {err}")
        log.error(
            "engine died (%s); restarting (%d/%d) and resending %d page(s)",
            err,
            self.stats.engine_restarts,
            self.cfg.engine_restarts,
            len(in_engine),
        )
        try:
            engine.restart()
        except Exception as e2:
            raise FatalEngineError(f"engine restart failed: {type(e2).__name__}: {e2}") from e2
        reqs = [req for _, req in in_engine.values()]
        self.stats.resubmitted += len(reqs)
        engine.submit(reqs)
        return engine

    # ---------------------------------------------------------------- writing
    def _finish_doc(self, st: _DocState) -> None:
        from postprocess import join_pages

        d = st.doc
        self._states.pop(d.doc_key, None)
        pages = [st.results[i] for i in range(st.todo)]
        failed = sum(1 for p in pages if p.status.is_failure)
        rate = failed / max(1, len(pages))
        status = "ok" if rate <= self.cfg.max_page_error_rate else "failed"
        error = None
        if status == "failed":
            limit = self.cfg.max_page_error_rate
            error = f"{failed}/{len(pages)} page(s) failed (> --max-page-error-rate {limit:g})"
        stem = d.output_stem
        try:
            # A done marker from an earlier run must not outlive a rewrite that fails half-way.
            self.outputs.delete(stem + ".done")
            self.outputs.write_bytes(stem + ".md", join_pages([p.markdown for p in pages]).encode("utf-8"))
            grounded = self.cfg.mode == "grounded"
            lines = [safe_dumps(p.to_json(with_regions=grounded)) for p in pages]
            self.outputs.write_bytes(stem + ".pages.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
            if self.cfg.mode == "grounded":
                reg_lines = [safe_dumps({"page": p.page, **r}) for p in pages for r in p.regions]
                self.outputs.write_bytes(
                    stem + ".regions.jsonl",
                    ("\n".join(reg_lines) + ("\n" if reg_lines else "")).encode("utf-8"),
                )
            marker = {
                "status": status,
                "source": self.inputs.uri(d.rel),
                "pages": len(pages),
                "page_count": st.page_count,
                "statuses": _count(p.status.value for p in pages),
                "engine": self.cfg.engine,
                "mode": self.cfg.mode,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if status == "ok":
                # The done marker is written last: its presence means every output above is complete.
                self.outputs.write_bytes(stem + ".done", safe_dumps(marker, indent=1).encode("utf-8"))
            else:
                self.outputs.delete(stem + ".done")
        except Exception as e:  # an output error fails this document, not the run
            status, error = "failed", f"cannot write outputs: {type(e).__name__}: {e}"
        if self.cfg.report:
            try:
                self._write_review(st, pages)
            except Exception as e:  # the review page is a convenience, never a failure
                log.warning("%s: review page not written: %s", d.doc_key, e)
        st.stack.close()
        seconds = time.perf_counter() - st.started
        src = self.inputs.uri(d.rel)
        if status == "ok":
            render_avg = sum(p.render_seconds for p in pages) / max(1, len(pages))
            log.info(
                "done %s → %s.md (%d pages, %.1f s, render %.3f s/page)%s",
                src,
                stem,
                len(pages),
                seconds,
                render_avg,
                f"; {failed} page(s) failed" if failed else "",
            )
        else:
            log.error("FAILED %s: %s", src, error)
        self.doc_results.append(
            DocResult(d.doc_key, src, stem, status, tuple(pages), error, seconds, st.page_count or 0)
        )
        self.progress.doc_done(ok=status == "ok")

    def _write_review(self, st: _DocState, pages: list[PageResult]) -> None:
        recs = [p.to_json(with_regions=True) for p in pages]
        html = _isolated_review(
            st.local_path,
            recs,
            st.doc.output_stem,
            self.cfg.password,
            self.cfg.render_memory_mb,
            timeout_s=max(120.0, 2 * self.cfg.render_timeout_s),
        )
        self.outputs.write_bytes(st.doc.output_stem + ".review.html", html.encode("utf-8"))


def _review_child(
    conn: Any, pdf: str, recs: list[dict[str, Any]], title: str, password: str | None, mem_mb: int
) -> None:
    from runner.render import prepare_worker
    from runner.report import render_review_html

    prepare_worker(mem_mb)
    conn.send(render_review_html(pdf, recs, title=title, password=password))
    conn.close()


def _isolated_review(
    pdf: str, recs: list[dict[str, Any]], title: str, password: str | None, mem_mb: int, timeout_s: float
) -> str:
    """The review page re-renders thumbnails from the PDF: like every PDF operation that runs in
    a spawned child with a memory limit and a deadline, never in the main process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_review_child, args=(child, pdf, recs, title, password, mem_mb), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise TimeoutError(f"review page took longer than {timeout_s:g} s")
        html: str = parent.recv()
        return html
    except EOFError:
        raise RuntimeError(f"review worker died (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()


def _geometry(img: PageImage) -> Any:
    from postprocess import PageGeometry

    return PageGeometry(img.width, img.height, img.page_width_pt, img.page_height_pt)


def _region_records(regions: Any) -> tuple[dict[str, Any], ...]:
    """Grounded regions as written to page records and ``<stem>.regions.jsonl`` (boxes in PDF points)."""
    return tuple(
        {"label": r.label, "box_pt": [[round(float(v), 2) for v in b] for b in r.boxes_pt], "text": r.text}
        for r in regions
    )


def _local_pool(cfg: RunConfig) -> RenderPool:
    return RenderPool(
        workers=cfg.render_workers,
        render_timeout_s=cfg.render_timeout_s,
        open_timeout_s=cfg.open_timeout_s,
        mem_limit_mb=cfg.render_memory_mb,
    )


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out
