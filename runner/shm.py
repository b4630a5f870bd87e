"""Render results through shared memory (render stage, transport between processes).

A rendered page for the vLLM engine is ~27 MB: 6 MB of pixels plus ~21 MB of preprocessed
image tensors. Through a pipe that is pickled by the worker, copied through the kernel and
unpickled by the main process: measured 26-37 ms of the main process' time per page on the 2-core
box (``NOTES.md``), the same process that feeds vLLM and runs the scheduler, under one GIL: it
caps how fast pages can enter the engine. Here every large buffer (a numpy array or a page's
pixel bytes of at least ``MIN_BYTES``) is written by the worker into a file in ``/dev/shm``
and only its name travels through the pipe; the main process maps it (no copy: arrays over the
mapping, pixels as a read-only memoryview of it) and unlinks the name at once, so the memory is
freed with the last reference.

Falls back to plain pickling, per buffer, when ``/dev/shm`` is missing or full (a container's
64 MB default): ``posix_fallocate`` reserves the space first, so a full tmpfs is an error here,
not a SIGBUS in the worker. Names carry the main process' and the worker's pids
(``ocr-page-<main>-<worker>-<n>``) so that what a killed worker or a killed run leaves behind is
removed by ``cleanup`` (pool close, worker replacement) and ``cleanup_stale`` (pool start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import mmap
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runner.records import PageImage

SHM_DIR = Path("/dev/shm")
PREFIX = "ocr-page-"
MIN_BYTES = 1 << 20  # smaller buffers are cheaper to pickle than to map


def available() -> bool:
    """True where render results can go through shared memory (Linux with a writable /dev/shm)."""
    if os.environ.get("RUNNER_NO_SHM") == "1" or not sys.platform.startswith("linux"):
        return False
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


_counter = itertools.count()
_owner: int | None = None  # the main process' pid, fixed when the worker starts
_written: list[str] = []  # names written for the message being built


def set_owner(pid: int | None) -> None:
    """Name files after ``pid`` (the pool's process) even if this worker outlives it."""
    global _owner
    _owner = pid


def _write(data: memoryview) -> str | None:
    """Copy ``data`` into a new shared-memory file; its name, or None when there is no room."""
    owner = _owner if _owner is not None else os.getppid()
    name = f"{PREFIX}{owner}-{os.getpid()}-{next(_counter)}"
    path = SHM_DIR / name
    n = data.nbytes
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, n)  # ENOSPC here, not SIGBUS while writing into the mapping
        with mmap.mmap(fd, n) as mm:
            mm[:] = data
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    finally:
        os.close(fd)
    _written.append(name)
    return name


def _map(name: str) -> mmap.mmap:
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
        path.unlink()  # the mapping stays valid; the memory goes with its last reference


def _attach_array(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(_map(name), dtype=np.dtype(dtype)).reshape(shape)


def _attach_page(name: str, fields: dict[str, Any]) -> PageImage:
    # A read-only view of the mapping, no copy: copying the ~6 MB of pixels out of the fresh
    # mapping (page faults + memcpy) was 38% of the CLI main thread's samples while the first
    # wave entered (GPU session 11, ``RUNNER_STACK_SAMPLE``), and most pages never read their
    # pixels again. The mapping lives as long as the view; PageImage pickles it as bytes.
    return PageImage(pixels=memoryview(_map(name)).toreadonly(), **fields)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and obj.nbytes >= MIN_BYTES and obj.dtype.hasobject is False:
            arr = np.ascontiguousarray(obj)
            name = _write(arr.data.cast("B"))
            if name is not None:
                return _attach_array, (name, arr.dtype.str, arr.shape)
        elif isinstance(obj, PageImage) and len(obj.pixels) >= MIN_BYTES:
            name = _write(memoryview(obj.pixels))
            if name is not None:
                fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "pixels"}
                return _attach_page, (name, fields)
        return NotImplemented


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with its large buffers moved to shared memory (worker side)."""
    _written.clear()
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def discard_last() -> None:
    """Remove what the last ``dumps`` wrote (its message could not be sent)."""
    for name in _written:
        with contextlib.suppress(OSError):
            (SHM_DIR / name).unlink()
    _written.clear()


def loads(data: bytes) -> Any:
    """The object back, its buffers mapped from shared memory and their names removed."""
    return pickle.loads(data)


def _remove(pattern: str) -> int:
    n = 0
    for p in SHM_DIR.glob(pattern):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def cleanup(main_pid: int, worker_pid: int | None = None) -> int:
    """Remove what a worker (or every worker of ``main_pid``) wrote and nobody mapped."""
    if not SHM_DIR.is_dir():
        return 0
    return _remove(f"{PREFIX}{main_pid}-{worker_pid if worker_pid is not None else '*'}-*")


def cleanup_stale() -> int:
    """Remove the leftovers of runs whose main process no longer exists (killed runs)."""
    if not SHM_DIR.is_dir():
        return 0
    n = 0
    pids = set()
    for p in SHM_DIR.glob(f"{PREFIX}*"):
        with contextlib.suppress(ValueError, IndexError):
            pids.add(int(p.name[len(PREFIX) :].split("-")[0]))
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            n += cleanup(pid)
        except PermissionError:  # alive, another user's
            continue
    return n
