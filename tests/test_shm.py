"""Render results through shared memory (runner/shm.py): same results as through the pipe,
nothing left in /dev/shm, a full /dev/shm falls back to the pipe."""

from __future__ import annotations

import errno
import os
import pickle
import time

import numpy as np
import pdfgen
import pytest

from runner import shm
from runner.records import PageImage
from runner.render import RenderPool, RenderTask

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here")

HOOK = (
    "runner.vllm_plugin.preprocess:worker_hook",
    {"base_size": 1024, "image_size": 640, "crop_mode": True, "strategy": "v1"},
)


def _ours() -> list[str]:
    return sorted(p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{os.getppid()}-{os.getpid()}-*"))


def _page(pixels: bytes, extra: dict) -> PageImage:
    return PageImage("d", 0, 100, 100, "RGB", pixels, 72.0, 1.0, 1.0, 0.1, False, "", "text", None, extra)


def test_roundtrip_maps_large_buffers_and_leaves_nothing() -> None:
    big = np.arange(3 << 20, dtype=np.uint16).reshape(3, 1 << 20)
    strided = np.arange(4 << 20, dtype=np.uint8)[::2]  # not contiguous: copied, same values
    small = np.arange(10)
    page = _page(os.urandom(2 << 20), {"hook": {"big": big, "strided": strided, "small": small}})
    data = shm.dumps(page)
    assert len(data) < 64 << 10 and len(_ours()) == 3  # three buffers went by name
    back = shm.loads(data)
    assert _ours() == []  # unlinked as soon as mapped
    assert back.pixels == page.pixels and back.text_layer == "text"
    for k in ("big", "strided", "small"):
        assert np.array_equal(back.extra["hook"][k], page.extra["hook"][k])
    assert back.extra["hook"]["big"].flags.writeable and back.extra["hook"]["big"].flags.c_contiguous


def test_pixels_arrive_without_a_copy_and_still_pickle_and_decode() -> None:
    """The page's pixels come back as a read-only view of the mapping (no copy), the page still
    pickles (as bytes: to a render worker, to Ray) and decodes to the same image."""
    pixels = os.urandom(1200 * 1000 * 3)
    page = PageImage("d", 0, 1200, 1000, "RGB", pixels, 72.0, 1.0, 1.0, 0.1, False, "", "text", None, {})
    back = shm.loads(shm.dumps(page))
    assert _ours() == []
    assert isinstance(back.pixels, memoryview) and back.pixels.readonly
    assert back.pixels == pixels and len(back.pixels) == len(pixels) and back.pixels
    assert back.to_pil().tobytes() == page.to_pil().tobytes()
    again = pickle.loads(pickle.dumps(back))
    assert isinstance(again.pixels, bytes) and again.pixels == pixels and again == page
    assert shm.loads(shm.dumps(back)).pixels == pixels  # a worker can send such a page on again
    with pytest.raises(TypeError):
        back.pixels[0] = 0  # type: ignore[index]


def test_full_shm_falls_back_to_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, off: int, n: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    arr = np.ones(2 << 20, dtype=np.uint8)
    data = shm.dumps({"a": arr})
    assert len(data) > 2 << 20 and _ours() == []  # pickled inline, the failed file removed
    assert np.array_equal(shm.loads(data)["a"], arr)


def test_stale_files_of_dead_runs_are_removed_live_ones_kept() -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = shm.SHM_DIR / f"{shm.PREFIX}{dead}-1-0"
    live = shm.SHM_DIR / f"{shm.PREFIX}{os.getpid()}-1-0"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        shm.cleanup_stale()
        assert not stale.exists() and live.exists()
        assert shm.cleanup(os.getpid(), 1) == 1 and not live.exists()
    finally:
        for p in (stale, live):
            if p.exists():
                p.unlink()


def _render(tmp_path, monkeypatch: pytest.MonkeyPatch, use_shm: bool) -> PageImage:
    monkeypatch.setenv("RUNNER_NO_SHM", "0" if use_shm else "1")
    p = pdfgen.text_pdf(tmp_path / "a.pdf", pages=1)
    with RenderPool(workers=1) as pool:
        assert pool._shm is use_shm
        pool.submit(RenderTask(1, "a", str(p), 0, dpi=144, hook=HOOK))
        t0 = time.monotonic()
        out: list = []
        while not out:
            out = pool.collect(timeout=0.2)
            assert time.monotonic() - t0 < 120
    assert out[0].kind == "ok", out[0].message
    assert not list(shm.SHM_DIR.glob(f"{shm.PREFIX}{os.getpid()}-*"))
    return out[0].payload


def test_render_pool_results_equal_with_and_without_shm(tmp_path, monkeypatch) -> None:
    a = _render(tmp_path, monkeypatch, use_shm=True)
    b = _render(tmp_path, monkeypatch, use_shm=False)
    assert len(a.pixels) > shm.MIN_BYTES and a.pixels == b.pixels
    ha, hb = a.extra["hook"], b.extra["hook"]
    assert ha.global_view.nbytes > shm.MIN_BYTES
    assert np.array_equal(ha.global_view, hb.global_view) and np.array_equal(ha.crops, hb.crops)
    assert (ha.tiles, ha.spec) == (hb.tiles, hb.spec)
    assert pickle.loads(pickle.dumps(a)).pixels == a.pixels  # still a plain picklable PageImage


def test_killed_worker_leftovers_are_removed(tmp_path) -> None:
    with RenderPool(workers=1) as pool:
        pool.wait_ready()
        w = pool._pool[0]
        left = shm.SHM_DIR / f"{shm.PREFIX}{os.getpid()}-{w.proc.pid}-99"
        left.write_bytes(b"x")  # as if the worker died after writing, before sending
        pool._replace(w)
        assert not left.exists()


def test_an_unsent_message_leaves_nothing_and_names_follow_the_owner() -> None:
    shm.set_owner(4242)
    try:
        shm.dumps({"a": np.ones(2 << 20, dtype=np.uint8)})
        written = list(shm.SHM_DIR.glob(f"{shm.PREFIX}4242-{os.getpid()}-*"))
        assert len(written) == 1  # named after the pool's process, not whoever the parent is now
        shm.discard_last()  # what the worker does when the main process is gone
        assert not any(p.exists() for p in written)
    finally:
        shm.set_owner(None)
