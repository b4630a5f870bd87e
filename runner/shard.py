"""Shard stage: which input documents this worker processes.

In: the relative input paths (from ``Storage.list_files``) and their page counts. Out: this shard's
paths. The assignment depends only on the *set* of inputs and their page counts, never on listing
order, machine or time, so every worker of a fleet computes the same partition on its own and the
union of all shards is every input exactly once.

Balance is by pages, not files: longest-processing-time-first greedy (largest document to the
least-loaded shard, ties broken by shard index), which keeps the heaviest shard within one document
of the mean (``max <= total/n + largest``) and usually far closer.

Page counts come from a cheap scan (open with PyMuPDF, ``len(doc)``) in a sandboxed child process
(memory cap, per-file time limit) so a hostile file cannot hang or exhaust the caller. Results are
cached in ``_page_counts.json`` in the *output* storage, keyed by input URI + size + mtime/ETag, so
reruns and the other shards skip the scan. Run the scan once before starting a fleet (the
multi-GPU launcher does) so all workers read the same cached counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import os
import selectors
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SCAN_TIMEOUT_S = 60.0  # per file; generous so the outcome is the same on a busy and an idle machine
SCAN_MEMORY_MB = 2048
SCAN_CHUNK = 64  # inputs downloaded (S3) and counted per child process


class _Storage(Protocol):
    """The part of ``runner.storage.Storage`` this module uses."""

    root: str

    def exists(self, rel: str) -> bool: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def write_bytes(self, rel: str, data: bytes) -> None: ...
    def local_path(self, rel: str) -> contextlib.AbstractContextManager[str]: ...
    def uri(self, rel: str) -> str: ...


# -- assignment -------------------------------------------------------------------------------------


def _tiebreak(rel: str) -> str:
    return hashlib.sha1(rel.encode("utf-8", "surrogatepass")).hexdigest()


def _weight(counts: dict[str, int], rel: str) -> int:
    # A zero-page (unreadable) document still costs an open and a record: weight it as one page.
    return max(1, int(counts.get(rel, 0)))


def assign_shards(rels: Iterable[str], counts: dict[str, int], num_shards: int) -> list[list[str]]:
    """Partition ``rels`` into ``num_shards`` lists balanced by page count (deterministic LPT)."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    order = sorted(set(rels), key=lambda r: (-_weight(counts, r), _tiebreak(r), r))
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    heap = [(0, i) for i in range(num_shards)]  # (pages assigned, shard index)
    for rel in order:
        load, i = heapq.heappop(heap)
        shards[i].append(rel)
        heapq.heappush(heap, (load + _weight(counts, rel), i))
    for shard in shards:
        shard.sort()
    return shards


def select_shard(rels: list[str], counts: dict[str, int], num_shards: int, shard_index: int) -> list[str]:
    """The inputs of shard ``shard_index`` of ``num_shards``, sorted."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    return assign_shards(rels, counts, num_shards)[shard_index]


def shard_balance(rels: list[str], counts: dict[str, int], num_shards: int) -> dict[str, Any]:
    """Pages and files per shard plus max/mean, for the run summary."""
    shards = assign_shards(rels, counts, num_shards)
    pages = [sum(int(counts.get(r, 0)) for r in s) for s in shards]
    mean = sum(pages) / num_shards
    return {
        "num_shards": num_shards,
        "pages_per_shard": pages,
        "files_per_shard": [len(s) for s in shards],
        "max_pages": max(pages),
        "mean_pages": round(mean, 3),
        "max_over_mean": round(max(pages) / mean, 4) if mean else 1.0,
    }


# -- page-count scan --------------------------------------------------------------------------------


# The scan runs in a child interpreter (``python -c``, nothing imported from this package, paths
# on stdin) so it works however the parent was started, and a hostile file that hangs or blows
# the memory cap kills only the child. The child imports PyMuPDF first and only then caps its
# address space at what it already uses + the limit (the cap is for the files, not for whatever
# the environment loads at start-up), then says ``ready``; then one line per input: its page count.
_SCAN_CHILD = """
import resource, sys
import pymupdf
pymupdf.TOOLS.mupdf_display_errors(False)
lim = int(sys.argv[1]) * 1024 * 1024
if lim > 0:
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        used = 0
    try:
        resource.setrlimit(resource.RLIMIT_AS, (used + lim, used + lim))
    except (ValueError, OSError):
        pass
sys.stdout.write("ready\\n")
sys.stdout.flush()
for line in sys.stdin:
    path = line.rstrip("\\n")
    try:
        with pymupdf.open(path) as doc:
            n = int(doc.page_count)
    except Exception:
        n = 0
    sys.stdout.write(f"{n}\\n")
    sys.stdout.flush()
"""
SCAN_STARTUP_S = 120.0  # a cold interpreter + PyMuPDF import on a busy machine


class ScanUnavailable(RuntimeError):
    """The page-count child cannot start at all (an environment problem, not a file's fault)."""


def _start_scanner(memory_mb: int) -> tuple[subprocess.Popen[str], Any]:
    """A scan child that has said ``ready``; raises ``ScanUnavailable`` with its stderr if not."""
    import tempfile

    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (returned: it lives as long as the child)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCAN_CHILD, str(memory_mb)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        line = proc.stdout.readline() if sel.select(timeout=SCAN_STARTUP_S) else ""
    finally:
        sel.close()
    if line.strip() == "ready":
        return proc, err
    proc.kill()
    proc.wait()
    err.seek(0)
    tail = err.read()[-600:].strip()
    err.close()
    raise ScanUnavailable(
        f"page-count scanner did not start (rc {proc.returncode}, memory cap {memory_mb} MB): "
        f"{tail or 'no output'}"
    )


def _scan_paths(
    paths: Sequence[str], timeout_s: float = SCAN_TIMEOUT_S, memory_mb: int = SCAN_MEMORY_MB
) -> list[int]:
    """Page count of each path, counted in a sandboxed child. A file that takes longer than
    ``timeout_s`` or kills the child (memory cap, crash) counts 0; a new child takes the rest.
    A child that cannot even start (seen on a GPU machine: SIGABRT before reading any file) is not
    a file's fault: the scan retries once without the memory cap, then raises ``ScanUnavailable``
    (a count of 0 for every file would silently unbalance, or with a cache, mis-partition shards)."""
    if any("\n" in p for p in paths):  # the child reads one path per line
        safe = [i for i, p in enumerate(paths) if "\n" not in p]
        counted = dict(zip(safe, _scan_paths([paths[i] for i in safe], timeout_s, memory_mb), strict=True))
        return [counted.get(i, 0) for i in range(len(paths))]
    results: list[int] = []
    while len(results) < len(paths):
        rest = paths[len(results) :]
        try:
            proc, err = _start_scanner(memory_mb)
        except ScanUnavailable as e:
            if memory_mb <= 0:
                raise
            log.warning("%s; scanning without the memory cap", e)
            memory_mb = 0
            proc, err = _start_scanner(memory_mb)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write("".join(p + "\n" for p in rest))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            for path in rest:
                if not sel.select(timeout=timeout_s):
                    log.warning("page count of %s timed out after %.0fs; counted as 0", path, timeout_s)
                    results.append(0)
                    break
                line = proc.stdout.readline()
                if not line:
                    log.warning(
                        "page count of %s killed its scanner (rc %s); counted as 0", path, proc.wait()
                    )
                    results.append(0)
                    break
                results.append(int(line))
        finally:
            sel.close()
            proc.kill()
            proc.wait()
            proc.stdout.close()
            err.close()
    return results


def _fingerprint(storage: _Storage, rel: str) -> str:
    """Size + version tag of an input without reading it: ETag on S3, mtime locally."""
    stat = getattr(storage, "stat", None)
    if callable(stat):
        size, tag = stat(rel)
        return f"{size}:{tag}"
    with storage.local_path(rel) as path:  # LocalStorage: the real file, no copy
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"


def _load_cache(out: _Storage, cache_rel: str) -> dict[str, Any]:
    try:
        if not out.exists(cache_rel):
            return {}
        data = json.loads(out.read_bytes(cache_rel))
    except (ValueError, OSError) as exc:
        log.warning("ignoring unreadable page-count cache %s: %s", out.uri(cache_rel), exc)
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") != CACHE_VERSION
        or not isinstance(data.get("files"), dict)
    ):
        return {}
    return dict(data["files"])


def page_counts(
    storage: _Storage,
    rels: list[str],
    cache_rel: str = "_page_counts.json",
    output_storage: _Storage | None = None,
    *,
    timeout_s: float = SCAN_TIMEOUT_S,
    memory_mb: int = SCAN_MEMORY_MB,
) -> dict[str, int]:
    """Page count of every input in ``rels`` (0 when unreadable), using and refreshing the cache
    ``cache_rel`` in ``output_storage`` (the input storage when none is given).

    Transport errors (a failed download) propagate instead of counting 0: a count must not depend
    on a network hiccup, or two shards could compute different partitions.
    """
    out = output_storage if output_storage is not None else storage
    cache = _load_cache(out, cache_rel)
    counts: dict[str, int] = {}
    todo: list[tuple[str, str, str]] = []  # (rel, cache key, fingerprint)
    for rel in sorted(set(rels)):
        key, fp = storage.uri(rel), _fingerprint(storage, rel)
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("fingerprint") == fp and isinstance(entry.get("pages"), int):
            counts[rel] = entry["pages"]
        else:
            todo.append((rel, key, fp))
    if not todo:
        return counts
    log.info("page-count scan: %d of %d inputs not cached", len(todo), len(counts) + len(todo))
    for chunk_start in range(0, len(todo), SCAN_CHUNK):
        chunk = todo[chunk_start : chunk_start + SCAN_CHUNK]
        with contextlib.ExitStack() as stack:
            paths = [stack.enter_context(storage.local_path(rel)) for rel, _, _ in chunk]
            found = _scan_paths(paths, timeout_s, memory_mb)
        for (rel, key, fp), pages in zip(chunk, found, strict=True):
            counts[rel] = pages
            cache[key] = {"fingerprint": fp, "pages": pages}
    payload = {"version": CACHE_VERSION, "files": dict(sorted(cache.items()))}
    try:
        out.write_bytes(cache_rel, json.dumps(payload, indent=0, sort_keys=True).encode())
    except (
        OSError,
        RuntimeError,
    ) as exc:  # the cache is an optimisation: a read-only output must not stop the run
        log.warning("could not write page-count cache %s: %s", out.uri(cache_rel), exc)
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m runner.shard --input-dir X --output-dir Y [--num-shards N]``: fill the page-count
    cache once before a fleet starts (``aws/launch_ssm.py`` runs it on one instance first), so the
    workers read one set of counts instead of each downloading the whole input; prints the balance."""
    import argparse

    from runner.storage import open_storage

    p = argparse.ArgumentParser(prog="python -m runner.shard", description=main.__doc__)
    p.add_argument("--input-dir", required=True, help="folder or s3://bucket/prefix with PDFs")
    p.add_argument("--output-dir", required=True, help="where the cache _page_counts.json is kept")
    p.add_argument("--num-shards", type=int, default=1, help="print the balance for this many shards")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    if args.s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint_url
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    inputs, outputs = open_storage(args.input_dir), open_storage(args.output_dir)
    rels = inputs.list_files()
    counts = page_counts(inputs, rels, output_storage=outputs)
    print(
        json.dumps(
            {
                "inputs": len(rels),
                "pages": sum(counts.values()),
                "unreadable": sum(1 for c in counts.values() if c == 0),
                "balance": shard_balance(rels, counts, max(1, args.num_shards)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
