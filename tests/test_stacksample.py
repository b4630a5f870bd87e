"""The in-process stack sampler (diagnostics for the CLI process's threads)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading

import pytest

from runner import stacksample


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(500))


def test_a_busy_thread_is_sampled_in_its_function() -> None:
    stop = threading.Event()
    t = threading.Thread(target=_spin, args=(stop,), name="spinner")
    t.start()
    try:
        samples = stacksample.sample(0.3, 0.002)
    finally:
        stop.set()
        t.join()
    assert sum(samples["spinner"].values()) > 10
    assert all(any(fn.startswith("_spin ") for fn in stack) for stack in samples["spinner"])
    text = stacksample.summarise(samples)
    assert "thread spinner:" in text and "_spin (test_stacksample.py" in text


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNNER_STACK_SAMPLE", raising=False)
    assert stacksample.start_from_env() is None
    monkeypatch.setenv("RUNNER_STACK_SAMPLE", "0.05:1")
    t = stacksample.start_from_env()
    assert t is not None
    t.join(timeout=5)
    assert not t.is_alive()


def _child(q: multiprocessing.Queue[str]) -> None:
    """A spawned child, as vLLM's engine core is: its watcher waits for the parent's trigger."""
    import logging

    class ToQueue(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            q.put(record.getMessage())

    logger = logging.getLogger("child-sampler")
    logger.setLevel(logging.INFO)
    logger.addHandler(ToQueue())
    t = stacksample.watch_in_child_from_env(logger, poll_s=0.01, give_up_s=30)
    assert t is not None and stacksample.watch_in_child_from_env(logger) is t  # once per process
    q.put("watching")
    t.join(timeout=30)


def test_the_engine_core_samples_itself_once_its_parent_is_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNNER_STACK_SAMPLE", "0.2:2")
    monkeypatch.setenv("RUNNER_STACK_SAMPLE_CORE", "1")
    # the CLI process itself (no multiprocessing parent) does not watch
    assert stacksample.watch_in_child_from_env(logging.getLogger("x")) is None
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue[str] = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    try:
        assert q.get(timeout=60) == "watching"
        with pytest.raises(queue.Empty):  # nothing sampled before the trigger
            q.get(timeout=0.3)
        t = stacksample.start_from_env()  # "engine ready": touches the trigger, samples itself
        assert t is not None
        msg = q.get(timeout=30)
        assert f"(engine core, pid {p.pid})" in msg and "thread MainThread:" in msg
        assert "_child (test_stacksample.py" in msg  # the child's main thread, seen in its own frame
        t.join(timeout=5)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    assert not os.path.exists(stacksample.trigger_path(os.getpid()))  # consumed by the child


def test_the_core_sampler_is_off_without_its_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_STACK_SAMPLE", "0.2:2")
    monkeypatch.delenv("RUNNER_STACK_SAMPLE_CORE", raising=False)
    assert stacksample.watch_in_child_from_env(logging.getLogger("x")) is None
    t = stacksample.start_from_env()
    assert t is not None
    t.join(timeout=5)
    assert not os.path.exists(stacksample.trigger_path(os.getpid()))


def test_a_trigger_no_engine_core_takes_is_removed_after_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_STACK_SAMPLE", "0.2:2")
    monkeypatch.setenv("RUNNER_STACK_SAMPLE_CORE", "1")
    t = stacksample.start_from_env()
    assert t is not None
    assert os.path.exists(stacksample.trigger_path(os.getpid()))  # there for a child to find
    t.join(timeout=5)
    assert not os.path.exists(stacksample.trigger_path(os.getpid()))
