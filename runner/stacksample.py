"""In-process stack sampling (diagnostics): where this process's Python threads spend a window.

``RUNNER_STACK_SAMPLE="DURATION[:INTERVAL_MS]"`` makes ``start_from_env()`` (called by the
pipeline when the engine is ready) sample every other thread's stack for DURATION seconds (every
INTERVAL_MS, default 5) and log, per thread, the functions with the most inclusive and self
samples. No ptrace and no extra dependency (py-spy needs ptrace, which containers often deny).
The sampler needs the GIL to look, so it sees threads at their switch points: a GIL-bound
thread is sampled in proportion to its GIL time, which is the quantity of interest here (the CLI
process's main thread and vLLM feeding thread share one GIL).

``RUNNER_STACK_SAMPLE_CORE=1`` (with ``RUNNER_STACK_SAMPLE``) samples vLLM's engine-core process
over the same window: the CLI touches a trigger file named after its pid when the engine is ready,
and the vLLM plugin, which runs in the engine core (a child of the CLI process), waits for its
parent's trigger (``watch_in_child_from_env``) and logs its own threads through vLLM's logger, so
the summary lands in the CLI's log beside the engine core's other lines. A thread blocked in C
(a CUDA sync, a socket) keeps its Python frame, so waiting shows up where it is waited for.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import types

log = logging.getLogger(__name__)


def _frame_name(frame: types.FrameType) -> str:
    code = frame.f_code
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


Samples = dict[str, collections.Counter[tuple[str, ...]]]


def sample(duration_s: float, interval_s: float = 0.005, depth: int = 48) -> Samples:
    """Stacks (outermost first) of every other thread, counted per thread name."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    out: Samples = collections.defaultdict(collections.Counter)
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        for tid, frame in sys._current_frames().items():
            if tid == me:
                continue
            stack: list[str] = []
            f: types.FrameType | None = frame
            while f is not None and len(stack) < depth:
                stack.append(_frame_name(f))
                f = f.f_back
            out[names.get(tid, str(tid))][tuple(reversed(stack))] += 1
        time.sleep(interval_s)
    return out


def summarise(samples: Samples, top: int = 15) -> str:
    lines = []
    for name, stacks in sorted(samples.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(stacks.values())
        incl: collections.Counter[str] = collections.Counter()
        self_: collections.Counter[str] = collections.Counter()
        for stack, n in stacks.items():
            for fn in set(stack):
                incl[fn] += n
            if stack:
                self_[stack[-1]] += n
        lines.append(f"thread {name}: {total} samples")
        lines.append("  inclusive: " + "; ".join(f"{fn} {n / total:.0%}" for fn, n in incl.most_common(top)))
        lines.append("  self: " + "; ".join(f"{fn} {n / total:.0%}" for fn, n in self_.most_common(top)))
    return "\n".join(lines)


def _spec() -> tuple[float, float] | None:
    """``RUNNER_STACK_SAMPLE="DURATION[:INTERVAL_MS]"`` as (seconds, seconds), or None."""
    spec = os.environ.get("RUNNER_STACK_SAMPLE")
    if not spec:
        return None
    parts = spec.split(":")
    return float(parts[0]), (float(parts[1]) / 1000 if len(parts) > 1 else 0.005)


def trigger_path(pid: int) -> str:
    """The file a CLI process touches when its engine is ready (read by its engine core)."""
    return os.path.join(tempfile.gettempdir(), f"runner-stacksample-{pid}")


def _sample_and_log(duration: float, interval: float, logger: logging.Logger, what: str, top: int) -> None:
    t0 = time.monotonic()
    res = sample(duration, interval)
    logger.info("stack samples%s over %.1f s:\n%s", what, time.monotonic() - t0, summarise(res, top))


def start_from_env() -> threading.Thread | None:
    spec = _spec()
    if spec is None:
        return None
    trigger = trigger_path(os.getpid()) if os.environ.get("RUNNER_STACK_SAMPLE_CORE") == "1" else None
    if trigger:
        with open(trigger, "w"):
            pass

    def run() -> None:
        _sample_and_log(*spec, log, "", 15)
        if trigger:  # no engine core took it (an engine without one): leave nothing in /tmp
            with contextlib.suppress(OSError):
                os.unlink(trigger)

    t = threading.Thread(target=run, name="stack-sampler", daemon=True)
    t.start()
    return t


def watch_in_child_from_env(
    logger: logging.Logger, poll_s: float = 0.2, give_up_s: float = 3600.0
) -> threading.Thread | None:
    """In a child process (vLLM's engine core): once the parent touches its trigger, sample this
    process's threads for the window and log the summary (25 functions per list)."""
    spec = _spec()
    if spec is None or os.environ.get("RUNNER_STACK_SAMPLE_CORE") != "1":
        return None
    global _core_watch
    if multiprocessing.parent_process() is None:  # the CLI process itself: start_from_env's job
        return None
    if _core_watch is not None:  # vLLM may load its plugins more than once in a process
        return _core_watch
    path = trigger_path(os.getppid())

    def run() -> None:
        end = time.monotonic() + give_up_s
        while not os.path.exists(path):
            if time.monotonic() > end:
                return
            time.sleep(poll_s)
        with contextlib.suppress(OSError):
            os.unlink(path)
        _sample_and_log(*spec, logger, f" (engine core, pid {os.getpid()})", 25)

    t = _core_watch = threading.Thread(target=run, name="stack-sampler-core", daemon=True)
    t.start()
    return t


_core_watch: threading.Thread | None = None
