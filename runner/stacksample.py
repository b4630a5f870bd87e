"""In-process stack sampling (diagnostics): where this process's Python threads spend a window.

``RUNNER_STACK_SAMPLE="DURATION[:INTERVAL_MS]"`` makes ``start_from_env()`` (called by the
pipeline when the engine is ready) sample every other thread's stack for DURATION seconds (every
INTERVAL_MS, default 5) and log, per thread, the functions with the most inclusive and self
samples. No ptrace and no extra dependency (py-spy needs ptrace, which containers often deny).
The sampler needs the GIL to look, so it sees threads at their switch points: a GIL-bound
thread is sampled in proportion to its GIL time, which is the quantity of interest here (the CLI
process's main thread and vLLM feeding thread share one GIL).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
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


def start_from_env() -> threading.Thread | None:
    spec = os.environ.get("RUNNER_STACK_SAMPLE")
    if not spec:
        return None
    parts = spec.split(":")
    duration = float(parts[0])
    interval = float(parts[1]) / 1000 if len(parts) > 1 else 0.005

    def run() -> None:
        t0 = time.monotonic()
        res = sample(duration, interval)
        log.info("stack samples over %.1f s:\n%s", time.monotonic() - t0, summarise(res))

    t = threading.Thread(target=run, name="stack-sampler", daemon=True)
    t.start()
    return t
