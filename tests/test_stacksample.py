"""The in-process stack sampler (diagnostics for the CLI process's threads)."""

from __future__ import annotations

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
