"""GIL convoy model (tooling, CPU): why the vLLM engine sets a 1 ms thread switch interval.

The CLI's process runs the scheduler/post-processing (main thread) and the thread that steps vLLM.
Feeding thread: each step = wait 20 ms with the GIL released (GPU), then ~2 ms of Python (vLLM's
output processing), in 4 pieces separated by GIL-releasing waits (zmq/queue). Main thread: idle,
or CPU-bound Python (post-processing) for the whole time. Steps per second for each case.

    python tools/gil_convoy.py

Seen on the 2-core CPU box (NOTES.md, "GPU session 3"): 44 steps/s with an idle main thread
whatever the interval; with a busy main thread 20 at Python's default 5 ms, 33 at 1 ms, 38 at 0.2 ms.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time


def py_work(ms: float) -> int:
    t = time.perf_counter() + ms / 1e3
    x = 0
    while time.perf_counter() < t:
        x += 1
    return x


def feeder(stop: threading.Event, n: list[int]) -> None:
    q: queue.Queue[int] = queue.Queue()
    while not stop.is_set():
        time.sleep(0.020)  # GPU step, GIL released
        for _ in range(4):  # output processing interleaved with GIL-releasing waits
            py_work(0.5)
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.0001)
        n[0] += 1


def run(main_busy: bool, interval: float, secs: float = 3.0) -> float:
    sys.setswitchinterval(interval)
    stop, n = threading.Event(), [0]
    t = threading.Thread(target=feeder, args=(stop, n))
    t.start()
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        if main_busy:
            py_work(10)
        else:
            time.sleep(0.01)
    stop.set()
    t.join()
    return n[0] / secs


if __name__ == "__main__":
    for busy in (False, True):
        for iv in (0.005, 0.001, 0.0002):
            print(f"main busy={busy!s:5} switchinterval={iv * 1e3:.1f} ms: {run(busy, iv):.1f} steps/s")
