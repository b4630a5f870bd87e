"""The vLLM engine (engine stage): DeepSeek-OCR / DeepSeek-OCR-2 on upstream vLLM, streaming.

In: ``PageRequest`` (page pixels plus, when the render workers ran ``worker_hook``, the model's
input tensors already computed, see ``runner/vllm_plugin/preprocess.py``). Out: ``EngineOutput``
with finish reason, token counts and whether the model stopped by itself (EOS).

Design (issue 7, numbers in ``tmp_pdf_runs/GPU_NOTES.md``):
1. Image preprocessing runs in the render worker processes (``worker_hook``), not here: upstream's
   processor costs ~120-235 ms per page on one core and capped the seeds at 3-6 pages/s.
2. A plugin processor (``runner/vllm_plugin/fast_processor.py``) accepts those tensors, so the
   feeding thread only tokenises a short prompt and hands buffers to the engine core.
3. One feeding thread owns vLLM's ``LLMEngine`` (``add_request`` + ``step``); ``submit``/``poll``
   only touch thread-safe queues, so the scheduler never blocks on generation. The engine core
   runs in its own process and keeps the GPU busy while this thread prepares the next requests.
4. The repetition guard is a batch-level, vectorised logits processor
   (``runner/vllm_plugin/guard_processor.py``) instead of upstream's per-request Python one.

vLLM is imported only in ``start()``; the constructor is cheap and raises ``EngineUnavailable``
at once on machines that cannot run vLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.adapters import EOS_TOKEN, ModelAdapter, adapter_for_config
from runner.engines.base import EngineDied, EngineUnavailable
from runner.records import EngineOutput, PageRequest
from runner.vllm_plugin.preprocess import view_spec

if TYPE_CHECKING:
    from runner.config import EngineConfig, RunConfig

log = logging.getLogger(__name__)

GUARD_FQCN = "runner.vllm_plugin.guard_processor:NGramGuardLogitsProcessor"
HOOK_FN = "runner.vllm_plugin.preprocess:worker_hook"
INSTALL_HINT = (
    "pip install '.[vllm]' on a Linux machine with an NVIDIA GPU, or use --engine hf / --engine text"
)
TESTED_VLLM = ("0.26.0",)


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here (cheap: no import of vllm or torch), or None."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {INSTALL_HINT}"
    if not (
        Path("/dev/nvidiactl").exists()
        or Path("/proc/driver/nvidia/version").exists()
        or os.environ.get("RUNNER_ASSUME_GPU") == "1"
    ):
        return f"no NVIDIA GPU/driver found on this machine: {INSTALL_HINT}"
    return None


#: page sizes of the warm-up: A4 portrait and landscape (3x2 / 2x3 tile grids), a square page
#: (2x2), a small Letter page at 72 dpi (no tiles): different vision-token counts per page
WARMUP_PAGE_SIZES: tuple[tuple[int, int], ...] = ((1190, 1684), (1684, 1190), (1400, 1400), (612, 792))
WARMUP_STEPS_BEFORE_LATE = 4


@dataclasses.dataclass(frozen=True)
class WarmupItem:
    size: tuple[int, int]
    resolution: str | None  # None: the engine's resolution
    max_tokens: int
    late: bool  # added after the first steps, while the others decode


def warmup_plan(n: int, large_resolution: str | None = None) -> list[WarmupItem]:
    """``n`` synthetic pages (plus 8 at the Large resolution when there is one) whose steps take
    the token counts of a real run: several page shapes (different prompt lengths), output
    lengths 16-32 (the decode batch shrinks through many sizes), a third added while the rest
    decode (mixed prefill + decode steps). Kernels JIT-compiled per shape (Triton's MoE kernel
    specialises on sizes divisible by 16) then compile here, not in the first real pages."""
    first = max(1, (2 * n) // 3)
    items = [
        WarmupItem(WARMUP_PAGE_SIZES[i % len(WARMUP_PAGE_SIZES)], None, 16 + (i * 7) % 17, i >= first)
        for i in range(n)
    ]
    if large_resolution and n >= 8:
        items += [WarmupItem(WARMUP_PAGE_SIZES[j % 2], large_resolution, 16 + j, True) for j in range(8)]
    return items


SWITCH_INTERVAL_MS = 1.0


def _set_switch_interval() -> None:
    """A shorter GIL switch interval for this process (Python's default: 5 ms).

    The thread that steps vLLM gives the GIL up on every wait for the engine core and must get it
    back from the scheduler thread, which post-processes and writes pages; with the default it can
    wait up to 5 ms each time, on ~20 ms decode steps. A CPU model of that (tools/gil_convoy.py):
    20 steps/s at 5 ms vs 33 at 1 ms with a busy main thread, 44 with an idle one. Not yet
    measured on a GPU; ``RUNNER_SWITCH_INTERVAL_MS`` sets another value (0: leave Python's)."""
    import sys

    try:
        ms = float(os.environ.get("RUNNER_SWITCH_INTERVAL_MS", SWITCH_INTERVAL_MS))
    except ValueError:
        ms = SWITCH_INTERVAL_MS
    if ms > 0:
        sys.setswitchinterval(ms / 1000.0)


def _export_memory_cap(cap_gib: float | None) -> None:
    """Hand ``--gpu-memory-gib``'s allocator cap to the engine core (spawned: it inherits the
    environment; runner/vllm_plugin/memory_cap.py applies it). No cap: the variable is removed, so
    a restart after a capped engine in the same process is not capped by accident."""
    from runner.vllm_plugin.memory_cap import ENV

    if cap_gib:
        os.environ[ENV] = f"{cap_gib:g}"
    else:
        os.environ.pop(ENV, None)


def adapter_for_model(model: str) -> ModelAdapter:
    """The adapter for ``--model`` without downloading anything (local config.json, or hub id)."""
    from runner.adapters import ADAPTERS

    cfg = Path(model).expanduser() / "config.json"
    if cfg.is_file():
        return adapter_for_config(json.loads(cfg.read_text(encoding="utf-8")))
    for a in ADAPTERS.values():
        if a.default_model.lower() == model.lower():
            return a
    return ADAPTERS["deepseek-ocr-2"] if "ocr-2" in model.lower() else ADAPTERS["deepseek-ocr"]


def engine_kwargs(ec: EngineConfig, model_path: str, guard: bool) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for an ``EngineConfig`` (pure; tested without vLLM)."""
    kw: dict[str, Any] = dict(
        model=model_path,
        tokenizer=model_path,
        trust_remote_code=False,
        dtype="bfloat16",
        kv_cache_dtype=ec.kv_cache_dtype,
        gpu_memory_utilization=ec.gpu_memory_utilization,
        max_num_seqs=ec.max_num_seqs,
        max_model_len=ec.max_model_len,
        tensor_parallel_size=ec.tensor_parallel_size,
        seed=ec.seed,
        load_format=ec.load_format,
        limit_mm_per_prompt={"image": 1},
        # Inputs arrive as precomputed tensors with explicit ids: no processor cache needed, and
        # the dict input path is vLLM's "embeddings" path, which must be enabled.
        mm_processor_cache_gb=0,
        enable_mm_embeds=True,
        disable_log_stats=True,
        # Every page is a new image, so the prefix cache almost never hits (a retry of the same
        # view could, if its blocks survived the hundreds of pages admitted meanwhile), while its
        # block hashing and bookkeeping run in the engine core's step, which bounds decode here:
        # vLLM 0.26's scheduler measured 21.8 -> 19.9 ms/step at 512 requests and 10.4 -> 8.8 at
        # 256 without it (NOTES.md, "vLLM's scheduler cost per decode step").
        # ``--vllm-arg enable_prefix_caching=true`` turns it back on.
        enable_prefix_caching=False,
    )
    if ec.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = ec.max_num_batched_tokens
    if ec.max_num_seqs > 512:
        # vLLM captures CUDA graphs up to 512 sequences by default; larger decode batches would
        # run without them.
        kw["compilation_config"] = {"max_cudagraph_capture_size": ec.max_num_seqs}
    if ec.cache_dir:
        kw["download_dir"] = ec.cache_dir
    if ec.quantization:
        kw["quantization"] = ec.quantization
    elif ec.enable_fp8_weights:
        kw["quantization"] = "fp8"
    if ec.mm_encoder_tp_mode:
        kw["mm_encoder_tp_mode"] = ec.mm_encoder_tp_mode
    if ec.cpu_offload_gb:
        kw["cpu_offload_gb"] = ec.cpu_offload_gb
    if guard:
        kw["logits_processors"] = [GUARD_FQCN]
    prof_dir = os.environ.get("RUNNER_PROFILE_DIR")
    if prof_dir:  # diagnostics: torch profiler windows in the engine core (StepProfiler)
        kw["profiler_config"] = {
            "profiler": "torch",
            "torch_profiler_dir": os.path.abspath(prof_dir),
            # RUNNER_PROFILE_STACK=1: Python stacks too (heavy; shows where host time goes)
            "torch_profiler_with_stack": os.environ.get("RUNNER_PROFILE_STACK") == "1",
        }
    for name, text in ec.vllm_args:
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        if isinstance(value, dict) and isinstance(kw.get(name), dict):
            value = {**kw[name], **value}
        kw[name] = value
    return kw


@contextlib.contextmanager
def _start_lock() -> Any:
    """``RUNNER_ENGINE_START_LOCK`` (set by ``--engines-per-gpu``): engines sharing a GPU start one
    at a time, so vLLM's memory profiling of one never sees another's allocations in progress."""
    path = os.environ.get("RUNNER_ENGINE_START_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a+") as fh:
        t0 = time.monotonic()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("waiting for another engine on this GPU to finish starting (%s)", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("start-up lock taken after %.1f s", time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wait_for_gpu_peers(timeout_s: float = 1800.0, poll_s: float = 0.5) -> None:
    """``RUNNER_ENGINE_GPU_PEERS=K`` (``--engines-per-gpu K``): take pages only once all K engines
    on this GPU are ready, so they work side by side from the start (the start-up lock makes the
    K-th engine ready minutes after the first, which would otherwise run alone meanwhile).
    Each engine leaves ``<lock>.ready.<pid>``; after ``timeout_s`` it goes on with a warning."""
    from runner.launcher import gpu_peers

    lock = os.environ.get("RUNNER_ENGINE_START_LOCK")
    peers = gpu_peers()
    if not lock or peers <= 1:
        return
    Path(f"{lock}.ready.{os.getpid()}").touch()
    folder, name = os.path.split(lock)
    t0 = time.monotonic()
    while True:
        ready = [n for n in os.listdir(folder or ".") if n.startswith(name + ".ready.")]
        if len(ready) >= peers:
            if time.monotonic() - t0 > 1:
                log.info(
                    "all %d engines on this GPU ready after %.1f s of waiting", peers, time.monotonic() - t0
                )
            return
        if time.monotonic() - t0 > timeout_s:
            log.warning(
                "only %d of %d engines on this GPU ready after %.0f s; going on", len(ready), peers, timeout_s
            )
            return
        time.sleep(poll_s)


def parse_profile_windows(text: str) -> list[tuple[int, int]]:
    """``"5:10,300:30"`` -> [(5, 10), (300, 30)]: profile 10 engine steps from step 5, then 30
    from step 300 (steps counted from "engine ready"). Windows must not overlap."""
    windows: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, _, count = part.partition(":")
        w = (int(start), int(count or 10))
        if w[0] < 0 or w[1] < 1 or (windows and w[0] < sum(windows[-1])):
            raise ValueError(f"bad profile window {part!r} in {text!r}")
        windows.append(w)
    return windows


class StepProfiler:
    """Torch-profiler windows over the engine core's steps (``RUNNER_PROFILE_DIR``,
    ``RUNNER_PROFILE_STEPS``): vLLM writes the kernel table of a window to
    ``profiler_out_0.txt``; it is renamed ``profile_<start>_<count>.txt`` with the window's wall
    time and step count appended, so a table's CUDA total can be read against the wall clock.
    Only ever called from the feeding thread (the one that owns the engine)."""

    def __init__(self, directory: str, windows: list[tuple[int, int]]) -> None:
        self.dir = directory
        self.windows = list(windows)
        self._t0 = 0.0

    def before_step(self, engine: Any, step: int) -> None:
        if self.windows and step == self.windows[0][0]:
            try:
                engine.start_profile()
            except Exception:
                log.exception("profiler: start failed; profiling off")
                self.windows = []
                return
            self._t0 = time.perf_counter()
            log.info("profiler: window %s started at step %d", self.windows[0], step)

    def after_step(self, engine: Any, step: int) -> None:
        """``step`` = steps done so far."""
        if not self.windows or step != sum(self.windows[0]):
            return
        start, count = self.windows.pop(0)
        wall = time.perf_counter() - self._t0
        try:
            engine.stop_profile()
            src = os.path.join(self.dir, "profiler_out_0.txt")
            dst = os.path.join(self.dir, f"profile_{start}_{count}.txt")
            if os.path.exists(src):
                os.replace(src, dst)
                with open(dst, "a") as f:
                    f.write(f"\nwindow: steps {start}..{start + count - 1}, wall {wall:.3f} s\n")
        except Exception:
            log.exception("profiler: stop failed")
        log.info(
            "profiler: window (%d, %d) done: %.3f s wall, %.1f ms/step",
            start,
            count,
            wall,
            1e3 * wall / count,
        )


def _step_profiler() -> StepProfiler | None:
    d = os.environ.get("RUNNER_PROFILE_DIR")
    if not d:
        return None
    return StepProfiler(
        os.path.abspath(d), parse_profile_windows(os.environ.get("RUNNER_PROFILE_STEPS", "5:10,300:30"))
    )


def _check_plugin_installed() -> None:
    """The engine core is a spawned process: our model subclasses reach it only through the
    ``vllm.general_plugins`` entry point of the installed project (pyproject.toml)."""
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    if "runner.vllm_plugin:register_all" not in names:
        log.warning(
            "the project's vLLM plugin entry point is not installed (run `pip install -e .`): the "
            "engine core will run upstream's model code (per-page vision encoder)"
        )


@dataclass(frozen=True)
class _Pending:
    request: PageRequest
    submitted: float


class VllmEngine:
    """Streaming engine over vLLM's ``LLMEngine``; see the module docstring."""

    name = "vllm"
    needs_pixels = True
    needs_text_markdown = False
    check_degenerate = True
    #: the fast processor (runner/vllm_plugin) takes the resolution per request, so the Large pass
    #: reuses this engine instead of starting a second one
    supports_request_resolution = True

    @property
    def large_resolution(self) -> str:
        return self.adapter.large_resolution

    @property
    def resolution(self) -> str:
        return self.ec.resolution or self.adapter.default_resolution

    def hook_for(self, resolution: str | None) -> tuple[str, dict[str, Any]]:
        """The render-worker hook that prepares a page at ``resolution`` (the Large pass)."""
        return (HOOK_FN, view_spec(self.adapter, resolution).as_kwargs())

    def __init__(self, config: RunConfig) -> None:
        reason = vllm_unavailable_reason()
        if reason:
            raise EngineUnavailable(reason)
        self.cfg = config
        self.ec = config.engine_config
        self.adapter = adapter_for_model(self.ec.model)
        self.spec = view_spec(self.adapter, self.ec.resolution)
        #: run by the render workers on every non-blank page (see runner/render.py)
        self.worker_hook: tuple[str, dict[str, Any]] | None = (HOOK_FN, self.spec.as_kwargs())
        self._llm: Any = None
        self._inbox: queue.Queue[PageRequest | None] = queue.Queue()
        self._outbox: queue.Queue[EngineOutput] = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._guard_args: dict[str, Any] = {}
        self._tokenizer: Any = None
        self.startup_seconds = 0.0
        self.stats = {"steps": 0, "added": 0, "host_prep_s": 0.0, "slow_prep": 0}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.perf_counter()
        # The engine core must not be forked from a process that already holds render-pool pipes
        # and threads: seen on the GPU machine, a forked engine core under the CLI lost half of
        # a run's pages (GPU_NOTES.md). Spawn, as every other worker process of the runner.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _set_switch_interval()
        _export_memory_cap(self.ec.torch_memory_cap_gib)
        import vllm

        from runner.model_files import resolve_model
        from runner.vllm_plugin.fast_processor import register

        if vllm.__version__ not in TESTED_VLLM:
            log.warning("vLLM %s is outside the tested range %s", vllm.__version__, TESTED_VLLM)
        files = resolve_model(self.ec.model, self.ec.cache_dir)
        self.adapter = files.adapter
        self.spec = view_spec(self.adapter, self.ec.resolution)
        self.worker_hook = (HOOK_FN, self.spec.as_kwargs())
        register()
        _check_plugin_installed()
        self._model_path = files.path
        with _start_lock():
            self._build()
            self._warmup()
        _wait_for_gpu_peers()
        self._start_thread()
        self.startup_seconds = time.perf_counter() - t0
        log.info("vLLM engine ready in %.1f s (%s, %s)", self.startup_seconds, self.adapter.key, files.path)

    def _build(self) -> None:
        from vllm import LLM

        kw = engine_kwargs(self.ec, self._model_path, self.ec.guard)
        self._llm = LLM(**kw)
        tok = self._llm.get_tokenizer()
        self._tokenizer = tok
        ids = self.adapter.resolve_special_tokens(tok)
        self._eos_id = ids.eos
        guard = self.adapter.guard
        from runner.engines.guard import GuardParams

        self._guard_args = (
            GuardParams(
                self.ec.ngram_size or guard.ngram_size,
                self.ec.ngram_window or guard.window,
                tuple(sorted(ids.whitelist)),
            ).extra_args()
            if self.ec.guard
            else {}
        )

    def _start_thread(self) -> None:
        self._dead = None
        # Each feeding thread gets its own stop event and inbox: an old thread that outlived
        # close() (stuck in step()) must never touch the rebuilt engine's state.
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(self._stop, self._inbox, self._llm.llm_engine),
            name="vllm-feed",
            daemon=True,
        )
        self._thread.start()

    def _warmup(self) -> None:
        """Run one full batch of tiny synthetic requests before the engine counts as ready.

        Measured on an H100 (GPU_NOTES.md): the first real batch ran 3x slower than later ones
        (Triton JIT of the MoE kernel for shapes vLLM's own warm-up does not cover, first encoder
        batches). Paying that here keeps it out of the pages' time; it is start-up time. The plan
        (``warmup_plan``) varies page shapes, output lengths and arrival so that the steps take
        the token counts a real run takes (session 3: identical pages gave only multiples of 16).
        """
        n = int(getattr(self.ec, "warmup_pages", -1))
        if n < 0:
            n = min(self.ec.max_num_seqs, 512)
        if n == 0:
            return
        from PIL import Image
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from runner.vllm_plugin.fast_processor import prepared_to_mm_data
        from runner.vllm_plugin.preprocess import prepare_image

        t0 = time.perf_counter()
        plan = warmup_plan(n, self.large_resolution)
        mm: dict[tuple[tuple[int, int], str | None], Any] = {}
        params: dict[int, Any] = {}
        for it in plan:
            if (it.size, it.resolution) not in mm:
                spec = self.spec if it.resolution is None else view_spec(self.adapter, it.resolution)
                mm[(it.size, it.resolution)] = prepared_to_mm_data(
                    prepare_image(Image.new("RGB", it.size, "white"), spec)
                )
            if it.max_tokens not in params:
                params[it.max_tokens] = SamplingParams(
                    temperature=0.0,
                    max_tokens=it.max_tokens,
                    ignore_eos=True,
                    detokenize=False,
                    output_kind=RequestOutputKind.FINAL_ONLY,
                    extra_args=dict(self._guard_args) if self._guard_args else None,
                )
        engine = self._llm.llm_engine

        def add(late: bool) -> None:
            for i, it in enumerate(plan):
                if it.late == late:
                    engine.add_request(
                        f"warmup-{i}",
                        {
                            "prompt": self.adapter.prompt("clean"),
                            "multi_modal_data": {"image": mm[(it.size, it.resolution)]},
                            "multi_modal_uuids": {"image": [f"warmup-{i}"]},
                        },
                        params[it.max_tokens],
                    )

        add(late=False)
        self._step_until_idle(engine, max_steps=WARMUP_STEPS_BEFORE_LATE)
        add(late=True)  # arrive while the first ones decode: mixed prefill + decode steps
        self._step_until_idle(engine)
        log.info("vLLM warm-up: %d synthetic pages in %.1f s", len(plan), time.perf_counter() - t0)

    def _step_until_idle(self, engine: Any, check_s: float = 0.5, max_steps: int | None = None) -> None:
        """Step ``engine`` until it has nothing left; raise ``EngineDied`` if its core process dies
        meanwhile (a first real batch that runs out of GPU memory kills it; vLLM 0.26's client
        would leave ``step()`` waiting for good: a watcher wakes it)."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(check_s):
                if self._core_dead():
                    self._wake_feeding_thread()
                    return

        watcher = threading.Thread(target=watch, name="vllm-warmup-watch", daemon=True)
        watcher.start()
        try:
            steps = 0
            while engine.has_unfinished_requests() and (max_steps is None or steps < max_steps):
                steps += 1
                try:
                    engine.step()
                except Exception as e:
                    if self._core_dead():
                        raise EngineDied(f"vLLM engine core process died during warm-up: {e!r}") from e
                    raise
        finally:
            done.set()

    def _core_client(self) -> Any:
        return getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)

    def _core_dead(self) -> bool:
        """vLLM's client flags a dead engine-core process (its monitor thread sees it exit)."""
        res = getattr(self._core_client(), "resources", None)
        return bool(getattr(res, "engine_dead", False))

    def _wake_feeding_thread(self) -> None:
        """vLLM 0.26's synchronous client does not wake a ``step()`` that waits for outputs when
        its engine core dies (the output thread exits without queueing an error; the async client
        does queue one). Seen on the GPU machine: a killed engine core left the run waiting for
        pages with the feeding thread blocked for good. Queue the error it would have raised."""
        q = getattr(self._core_client(), "outputs_queue", None)
        if q is not None:
            with contextlib.suppress(Exception):
                q.put_nowait(RuntimeError("vLLM engine core process died"))

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._core_dead():
            self._wake_feeding_thread()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # shutting down a dead engine may raise anything; log it
                log.debug("engine shutdown: %r", e)
            del llm
            gc.collect()

    def restart(self) -> None:
        """Drop in-flight work and rebuild the engine (after ``EngineDied``)."""
        log.warning("restarting the vLLM engine")
        self.close()
        with self._lock:
            self._pending.clear()
        self._inbox = queue.Queue()
        self._outbox = queue.Queue()
        with _start_lock():
            self._build()
        self._start_thread()

    # -- protocol -------------------------------------------------------------------------------
    def submit(self, requests: Sequence[PageRequest]) -> None:
        # Never raises: a request queued on a dead engine is resent by the scheduler after the
        # next poll() reports the death (the protocol: only poll raises EngineDied).
        now = time.perf_counter()
        with self._lock:
            for r in requests:
                self._pending[r.request_id] = _Pending(r, now)
        for r in requests:
            self._inbox.put(r)

    def poll(self, timeout: float = 0.0) -> list[EngineOutput]:
        out: list[EngineOutput] = []
        try:
            out.append(self._outbox.get(timeout=timeout) if timeout > 0 else self._outbox.get_nowait())
        except queue.Empty:
            pass
        while True:
            try:
                out.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        if out:
            # A request stops being pending when poll hands it over, not when vLLM finishes it:
            # the scheduler polls only while pending() > 0, so counting finished-but-unpolled
            # outputs as done stranded them in the outbox (seen on the GPU machine: CLI runs
            # stopped after the first wave of pages, GPU_NOTES.md).
            with self._lock:
                for o in out:
                    self._pending.pop(o.request_id, None)
        elif self._dead is not None:
            raise EngineDied(f"vLLM engine died: {self._dead!r}")
        elif self._core_dead():
            self._wake_feeding_thread()
            raise EngineDied("vLLM engine core process died (exited unexpectedly)")
        return out

    def pending(self) -> int:
        """Requests submitted and not yet returned by ``poll`` (finished-but-unpolled included)."""
        with self._lock:
            return len(self._pending)

    # -- feeding thread -------------------------------------------------------------------------
    def _run(self, stop: threading.Event, inbox: queue.Queue[PageRequest | None], engine: Any) -> None:
        beat = time.monotonic()
        prof = _step_profiler()
        try:
            while not stop.is_set():
                if self._pending and time.monotonic() - beat > 10:
                    # Heartbeat for diagnosing stalls (a CLI run on the GPU machine stopped
                    # returning pages with vLLM's engine core idle; GPU_NOTES.md).
                    beat = time.monotonic()
                    log.info(
                        "vllm engine: pending=%d inbox=%d vllm_unfinished=%d steps=%d added=%d "
                        "add_ms=%.1f (mean per added request, in this thread)",
                        len(self._pending),
                        inbox.qsize(),
                        engine.get_num_unfinished_requests(),
                        self.stats["steps"],
                        self.stats["added"],
                        1e3 * self.stats["host_prep_s"] / max(1, self.stats["added"]),
                    )
                busy = engine.has_unfinished_requests()
                self._drain_inbox(engine, inbox, block=not busy)
                if stop.is_set():
                    break
                if engine.has_unfinished_requests():
                    if prof:
                        prof.before_step(engine, int(self.stats["steps"]))
                    for ro in engine.step():
                        if ro.finished:
                            self._finish(ro)
                    self.stats["steps"] += 1
                    if prof:
                        prof.after_step(engine, int(self.stats["steps"]))
        except Exception as e:  # the engine core died (EngineDeadError) or stepping broke
            if not stop.is_set() and self._thread is threading.current_thread():
                log.exception("vLLM engine failed; in-flight pages will be resubmitted after a restart")
                self._dead = e

    def _drain_inbox(self, engine: Any, inbox: queue.Queue[PageRequest | None], *, block: bool) -> None:
        while True:
            try:
                item = inbox.get(timeout=0.05) if block else inbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                return
            block = False
            t0 = time.perf_counter()
            try:
                prompt, params = self._make_request(item)
                engine.add_request(item.request_id, prompt, params)
            except Exception as e:  # a request vLLM refuses (or that cannot be prepared) fails alone
                log.warning("request %s refused: %s: %s", item.request_id, type(e).__name__, e)
                self._fail(item, f"{type(e).__name__}: {e}")
                continue
            finally:
                self.stats["host_prep_s"] += time.perf_counter() - t0
            self.stats["added"] += 1

    def _make_request(self, req: PageRequest) -> tuple[dict[str, Any], Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from runner.vllm_plugin.fast_processor import prepared_to_mm_data
        from runner.vllm_plugin.preprocess import prepare_image

        spec = self.spec if req.resolution is None else view_spec(self.adapter, req.resolution)
        prepared = None if req.image_override is not None else req.image.extra.get("hook")
        if prepared is None or getattr(prepared, "spec", None) != spec:
            self.stats["slow_prep"] += 1
            img = req.image_override if req.image_override is not None else req.image.to_pil()
            prepared = prepare_image(img, spec)
        # The id keys vLLM's encoder and prefix caches (the latter off by default, see
        # engine_kwargs): same page + same view = same image features.
        # A crop of the page (ROI pass) is another image: its size and clip are part of the key.
        key = (
            f"{req.image.doc_key}:{req.image.page_index}:{req.image.width}x{req.image.height}:"
            f"{req.image.extra.get('clip')}:{spec.base_size}:{spec.image_size}:{spec.crop_mode}"
            if req.image_override is None
            else uuid.uuid4().hex
        )
        prompt = {
            "prompt": self.adapter.prompt(req.prompt_mode),
            "multi_modal_data": {"image": prepared_to_mm_data(prepared)},
            "multi_modal_uuids": {"image": [key]},
        }
        params = SamplingParams(
            temperature=req.temperature,
            max_tokens=self.ec.max_tokens,
            ignore_eos=self.ec.ignore_eos,
            skip_special_tokens=False,
            # No per-step incremental detokenisation in this (the feeding) process: the text is
            # decoded once when the page is finished (_finish). No stop strings are used.
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args=dict(self._guard_args) if self._guard_args else None,
            seed=self.ec.seed if req.temperature > 0 else None,
        )
        return prompt, params

    def _finish(self, ro: Any) -> None:
        with self._lock:
            p = self._pending.get(ro.request_id)
        if p is None:
            return
        c = ro.outputs[0]
        text = c.text or self._decode(c.token_ids)
        if text.endswith(EOS_TOKEN):
            text = text[: -len(EOS_TOKEN)]
        finish = c.finish_reason
        eos = finish == "stop" and c.stop_reason is None
        self._outbox.put(
            EngineOutput(
                request_id=ro.request_id,
                text=text,
                finish_reason=finish,
                stopped_by_eos=eos,
                prompt_tokens=len(ro.prompt_token_ids or ()),
                output_tokens=len(c.token_ids),
                seconds=time.perf_counter() - p.submitted,
            )
        )

    def _decode(self, token_ids: Sequence[int]) -> str:
        """The page's text from its tokens, decoded once (what vLLM's detokenizer would give)."""
        if not token_ids:
            return ""
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=False))

    def _fail(self, req: PageRequest, error: str) -> None:
        with self._lock:
            p = self._pending.get(req.request_id)
        self._outbox.put(
            EngineOutput(
                request_id=req.request_id,
                text="",
                finish_reason="error",
                error=error,
                seconds=time.perf_counter() - (p.submitted if p else time.perf_counter()),
            )
        )
