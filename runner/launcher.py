"""Launch stage (one machine, several GPUs): one worker process per GPU, each a shard of the input.

In: the CLI's own argument list (minus ``--gpus``) and the GPU ids. Each worker is
``python -m runner <same args> --num-shards N --shard-index i`` with ``CUDA_VISIBLE_DEVICES`` set to
its GPU, so it owns one engine on one device. When the arguments already name a shard of a
multi-machine fleet (``--num-shards S --shard-index s``), the two levels compose: worker ``i`` of
``N`` becomes global shard ``s*N + i`` of ``S*N``, the same numbering ``aws/launch_ssm.py`` uses.

Out: the workers' outputs (written by the workers themselves), their per-shard summaries
``_run_summary.shard-<k>-of-<n>.json`` merged by the parent into ``_run_summary.json``, one log file
per worker, a combined progress line every few seconds (done markers counted in the output
storage: no extra protocol between parent and workers), and an exit code that is non-zero when any
worker failed. A crashed worker's shard resumes on re-run because finished documents have done
markers; before starting workers the parent fills the page-count cache once, so every worker reads
the same counts and computes the same partition.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.profiles import WORKERS_ON_HOST_ENV
from runner.summary import SUMMARY_NAME, dumps, shard_summary_name

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
GPU_PEERS_ENV = "RUNNER_ENGINE_GPU_PEERS"  # how many engines share the worker's GPU


def _env_count(name: str) -> int:
    """A count this launcher gives its workers in the environment; 1 when absent or not a number."""
    try:
        return max(1, int(os.environ.get(name, "1")))
    except ValueError:
        return 1


def gpu_peers() -> int:
    """How many engines share this worker's GPU (``--engines-per-gpu``; 1 unless this launcher
    started the worker with more)."""
    return _env_count(GPU_PEERS_ENV)


def workers_on_host() -> int:
    """How many workers this launcher started on this host (they share its memory)."""
    return _env_count(WORKERS_ON_HOST_ENV)


# Totals that are meaningful when summed across shards; rates and ratios are recomputed instead.
_ADDITIVE_TOP = (
    "pages_total",
    "engine_restarts",
    "pages_resubmitted",
    "render_worker_restarts",
    "render_seconds_total",
)
_ADDITIVE_DICTS = ("files", "pages", "counters", "retries")


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its GPU, its global shard, the exact command and environment overrides."""

    gpu: str
    shard_index: int
    num_shards: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"shard-{self.shard_index}-of-{self.num_shards}"

    def summary_name(self) -> str:
        return shard_summary_name(self.shard_index, self.num_shards)


@dataclass(frozen=True)
class WorkerOutcome:
    spec: WorkerSpec
    returncode: int
    seconds: float
    log_path: str


# -- GPUs -------------------------------------------------------------------------------------------


def detect_gpus() -> list[str]:
    """GPU ids visible here: ``CUDA_VISIBLE_DEVICES`` when set, else one per ``nvidia-smi -L`` line."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def parse_gpus(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, ``"0,1"`` or a list of ids -> ids for ``CUDA_VISIBLE_DEVICES``. Explicit small
    integers are positions in the parent's own ``CUDA_VISIBLE_DEVICES`` when that is set."""
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            gpus = detect_gpus()
            if not gpus:
                raise ValueError(
                    "--gpus all: no GPU found (nvidia-smi -L lists none, CUDA_VISIBLE_DEVICES empty)"
                )
            return gpus
        items = [g.strip() for g in spec.split(",") if g.strip()]
    else:
        items = [str(g).strip() for g in spec if str(g).strip()]
    if not items:
        raise ValueError("--gpus: no GPU id given")
    if len(set(items)) != len(items):
        raise ValueError(f"--gpus: repeated GPU id in {items}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        parent = [g.strip() for g in visible.split(",") if g.strip()]
        if all(g.isdigit() for g in items):
            if any(int(g) >= len(parent) for g in items):
                raise ValueError(f"--gpus {','.join(items)}: only {len(parent)} GPU(s) visible ({visible})")
            items = [parent[int(g)] for g in items]
    return items


# -- argument plumbing ------------------------------------------------------------------------------


def _take_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """Remove ``name VALUE`` / ``name=VALUE`` from ``argv``; return the rest and the last value."""
    rest: list[str] = []
    value: str | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
            continue
        if a.startswith(name + "="):
            value = a[len(name) + 1 :]
        else:
            rest.append(a)
        i += 1
    return rest, value


def option_value(argv: Sequence[str], name: str) -> str | None:
    return _take_option(list(argv), name)[1]


def _allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on (Linux), ascending; empty where the OS cannot say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


MAX_TORCH_THREADS = 4  # the most OpenMP threads an engine process gets by default (measured value)


def worker_torch_threads(workers: int, environ: Any = None, cores: int | None = None) -> str | None:
    """``OMP_NUM_THREADS`` for each of ``workers`` engine processes on this host, or None to leave
    it alone (the operator set it).

    Unset, every process's torch and OpenMP pools take all cores, and they fight the render
    workers and each other: on the two-GPU machine (32 cores, GPU session 10) ``--gpus 0,1`` ran
    at 22.6 pages/s with the default and 28.0 with 4 threads each; two engines on one H100 (16
    cores, so 2 each) went from 15.2 to 18.0. One plain CLI alone is no exception: in GPU session
    12 one H200 ran at 12.9 pages/s with its pools unset and 16.7-18.3 with 4 threads.
    A quarter of each worker's share of the cores (the rest is its render processes and vLLM's
    own threads), at most ``MAX_TORCH_THREADS``; vLLM caps its own multi-GPU workers the same
    way (to 1)."""
    env = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in env:
        return None
    if cores is None:
        cores = len(_allowed_cpus()) or os.cpu_count() or 1
    return str(max(1, min(MAX_TORCH_THREADS, cores // (4 * max(1, workers)))))


def cap_torch_threads(environ: Any = None) -> str | None:
    """Give this engine process (a plain CLI run, or a launcher worker the operator left unset)
    ``worker_torch_threads``'s value in its environment, before torch is imported, so vLLM's
    engine core and every child inherit it. Returns the value set, or None when it was set."""
    env = os.environ if environ is None else environ
    threads = worker_torch_threads(workers_on_host(), env)  # workers_on_host() is >= 1
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
        if "torch" in sys.modules:  # imported already (a library caller): its pool is sized
            sys.modules["torch"].set_num_threads(int(threads))
    return threads


CPU_SET_ENV = "RUNNER_CPU_SET"  # the cores a worker pins itself (and its children) to
PIN_WORKERS_ENV = "RUNNER_PIN_WORKERS"  # "1": give each worker its own whole cores (experiment)


def _siblings(cpu: int) -> frozenset[int]:
    """The logical CPUs sharing ``cpu``'s physical core (itself alone when sysfs does not say)."""
    path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
    try:
        return frozenset(parse_cpu_list(Path(path).read_text()))
    except (OSError, ValueError):
        return frozenset({cpu})


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8,10-11"`` (the kernel's and taskset's format) -> ``[0, 1, 2, 3, 8, 10, 11]``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def worker_cpu_sets(
    workers: int, cpus: Sequence[int] | None = None, siblings: Callable[[int], frozenset[int]] = _siblings
) -> list[list[int]] | None:
    """Disjoint CPU sets, one per worker, made of whole physical cores (a core's hyper-threads
    stay together) in ascending order, so contiguous ids (usually one NUMA node) go together; None
    when there are fewer cores than workers. Experimental (``RUNNER_PIN_WORKERS=1``): on the
    two-GPU machine two engines' decode steps ran 20-30% slower than one alone with only 7 of 32
    cores busy (GPU session 10); whether pinning helps is not measured yet."""
    allowed = set(_allowed_cpus() if cpus is None else cpus)
    cores: list[list[int]] = []
    seen: set[int] = set()
    for c in sorted(allowed):
        if c in seen:
            continue
        core = sorted(siblings(c) & allowed | {c})
        seen.update(core)
        cores.append(core)
    if workers < 1 or len(cores) < workers:
        return None
    per, extra = divmod(len(cores), workers)
    sets, start = [], 0
    for i in range(workers):
        take = per + (1 if i < extra else 0)
        sets.append(sorted(c for core in cores[start : start + take] for c in core))
        start += take
    return sets


def apply_cpu_set(environ: Any = None) -> list[int] | None:
    """Pin this process (and what it starts later) to ``RUNNER_CPU_SET`` when the launcher set it."""
    env = os.environ if environ is None else environ
    text = env.get(CPU_SET_ENV)
    if not text or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        cpus = parse_cpu_list(text)
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError) as e:  # a bad or foreign set must not stop the worker
        log.warning("%s=%r not applied (%s); running on all allowed cores", CPU_SET_ENV, text, e)
        return None
    return cpus


def plan_workers(
    argv: Sequence[str],
    gpus: Sequence[str],
    worker_cmd: Sequence[str] = (sys.executable, "-m", "runner"),
    engines_per_gpu: int = 1,
    lock_dir: str | None = None,
) -> list[WorkerSpec]:
    """One ``WorkerSpec`` per GPU (``engines_per_gpu`` per GPU) with global shard numbers
    (fleet shard x local slot).

    Several engines on one GPU (issue 7: at 512 sequences a decode step is ~12 ms of GPU work and
    ~20 ms of vLLM host work in the engine core, so one engine leaves the GPU idle; a second
    engine's kernels fill those gaps): each gets ``1/K`` of the memory share and a start-up lock
    per GPU (``RUNNER_ENGINE_START_LOCK``), so vLLM's memory profiling never runs while another
    engine on the same GPU is still allocating."""
    if engines_per_gpu < 1:
        raise ValueError("--engines-per-gpu must be >= 1")
    rest, _ = _take_option(list(argv), "--gpus")
    rest, _ = _take_option(rest, "--engines-per-gpu")
    rest, s_num = _take_option(rest, "--num-shards")
    rest, s_idx = _take_option(rest, "--shard-index")
    # A PDF password travels to the workers in the environment (PDF_PASSWORD), never on their
    # command line, where any local user could read it in the process list.
    rest, password = _take_option(rest, "--password")
    secret_env = (("PDF_PASSWORD", password),) if password is not None else ()
    fleet_n, fleet_i = int(s_num or 1), int(s_idx or 0)
    if fleet_n < 1 or not 0 <= fleet_i < fleet_n:
        raise ValueError("--shard-index must be in [0, --num-shards)")
    if engines_per_gpu > 1:
        rest, util = _take_option(rest, "--gpu-memory-utilization")
        rest, run_gib = _take_option(rest, "--gpu-memory-gib")
        if run_gib is not None:
            rest += ["--gpu-memory-gib", f"{float(run_gib) / engines_per_gpu:.3f}"]
        elif util is not None:
            rest += ["--gpu-memory-utilization", f"{float(util) / engines_per_gpu:.4f}"]
        # else: each engine sizes its own share from the card (profiles.shared_gpu_utilization)
    slots = [(gpu, j) for gpu in gpus for j in range(engines_per_gpu)]
    n = len(slots)
    total = fleet_n * n
    if not any(a == "--progress" or a.startswith("--progress=") for a in rest):
        rest += ["--progress", "log"]  # workers write plain log lines; the parent shows progress
    threads = worker_torch_threads(n)
    cpu_sets = worker_cpu_sets(n) if os.environ.get(PIN_WORKERS_ENV) == "1" else None
    specs = []
    for i, (gpu, _j) in enumerate(slots):
        k = fleet_i * n + i
        cmd = (*worker_cmd, *rest, "--num-shards", str(total), "--shard-index", str(k))
        env: tuple[tuple[str, str], ...] = (
            ("CUDA_VISIBLE_DEVICES", gpu),
            (WORKERS_ON_HOST_ENV, str(n)),  # each sizes its in-flight window for a 1/n share of RAM
            *secret_env,
        )
        if threads is not None:
            env += (("OMP_NUM_THREADS", threads),)
        if cpu_sets is not None:
            env += ((CPU_SET_ENV, ",".join(map(str, cpu_sets[i]))),)
        if engines_per_gpu > 1:
            lock = os.path.join(lock_dir or tempfile.gettempdir(), f"runner-engine-start-gpu{gpu}.lock")
            env += (("RUNNER_ENGINE_START_LOCK", lock), (GPU_PEERS_ENV, str(engines_per_gpu)))
        specs.append(WorkerSpec(gpu=gpu, shard_index=k, num_shards=total, argv=tuple(cmd), env=env))
    return specs


# -- summaries --------------------------------------------------------------------------------------


def _add_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            dst[k] = dst.get(k, 0) + v
        elif isinstance(v, dict):
            _add_into(dst.setdefault(k, {}), v)


def merge_summaries(
    parts: dict[str, dict[str, Any]], wall_s: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One run summary from the workers' shard summaries: counts summed, docs concatenated,
    throughput recomputed as all pages over the longest worker's processing time (they ran at
    once), and again over the parent's wall time (start-up and prescan included)."""
    walls = [float(p["wall_seconds"]) for p in parts.values() if p.get("wall_seconds")]
    # Workers process concurrently; each one's wall time excludes its engine start-up (PERF.md's
    # definition), so the run's processing time is the longest worker's.
    processing_s = max(walls) if walls else wall_s
    merged: dict[str, Any] = {
        "merged_from": sorted(parts),
        "wall_seconds": round(processing_s, 3),
        "parent_wall_seconds": round(wall_s, 3),
    }
    for key in _ADDITIVE_DICTS:
        acc: dict[str, Any] = {}
        for p in parts.values():
            if isinstance(p.get(key), dict):
                _add_into(acc, p[key])
        merged[key] = dict(sorted(acc.items()))
    for key in _ADDITIVE_TOP:
        merged[key] = round(sum(float(p.get(key) or 0) for p in parts.values()), 3)
        if all(isinstance(p.get(key, 0), int) for p in parts.values()):
            merged[key] = int(merged[key])
    merged["docs"] = sorted(
        (d for p in parts.values() for d in p.get("docs", ())), key=lambda d: str(d.get("source", ""))
    )
    pages = merged.get("pages_total") or 0
    merged["pages_per_s"] = round(pages / processing_s, 4) if processing_s > 0 and pages else 0.0
    merged["pages_per_s_incl_startup"] = round(pages / wall_s, 4) if wall_s > 0 and pages else 0.0
    startups = [float(p["engine_startup_s"]) for p in parts.values() if p.get("engine_startup_s")]
    merged["engine_startup_s"] = round(max(startups), 3) if startups else 0.0
    for key in ("engine", "model", "mode", "dpi", "started", "shard_balance"):
        values = [p[key] for p in parts.values() if key in p]
        if values:
            merged[key] = min(values, key=str) if key == "started" else values[0]
    merged["per_shard"] = {
        name: {
            k: p.get(k)
            for k in ("shard", "files", "pages_total", "pages_per_s", "wall_seconds", "engine_startup_s")
        }
        for name, p in sorted(parts.items())
    }
    merged["shards"] = [sh for _, p in sorted(parts.items()) for sh in (p.get("shards") or [])]
    merged.update(extra or {})
    return merged


# -- running ----------------------------------------------------------------------------------------


def _pump(stream: Any, log_file: Any, prefix: str, echo: bool) -> None:
    for line in iter(stream.readline, ""):
        log_file.write(line)
        log_file.flush()
        if echo:
            sys.stderr.write(f"{prefix} {line}")
    stream.close()


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _default_prescan(argv: Sequence[str]) -> tuple[Any, int] | None:
    """Fill the page-count cache once (so all workers agree on the partition) and return
    ``(output storage, number of inputs)`` for progress; ``None`` when discovery is not possible
    here (the workers then scan for themselves)."""
    from runner.cli import build_parser, discover_inputs
    from runner.shard import page_counts
    from runner.storage import open_storage

    args = build_parser().parse_args(list(argv))
    root, rels = discover_inputs(args)
    inputs, outputs = open_storage(root), open_storage(args.output_dir)
    if rels:
        page_counts(inputs, rels, output_storage=outputs)
    return outputs, len(rels)


def _count_done(outputs: Any) -> int:
    try:
        return len(outputs.list_files((".done",)))
    except Exception:
        return -1


MPS_CONTROL = "nvidia-cuda-mps-control"


class MpsDaemon:
    """A private CUDA MPS control daemon for this run's workers (``--mps``).

    Several engines on one GPU (``--engines-per-gpu``) are separate processes: without MPS the
    GPU time-slices between their contexts, so one engine's kernels never run beside the
    other's. Under MPS their kernels share the GPU at once (one engine's memory-bound decode
    beside the other's compute-bound prefill). The daemon is private: its pipe and log folders
    are under the run's log folder and only the workers get ``CUDA_MPS_PIPE_DIRECTORY``, so
    other CUDA programs on the host are not routed through it. It is stopped when the run ends
    (``quit``). GPU settings (compute mode, MIG) are not touched."""

    def __init__(self, root: Path, binary: str = MPS_CONTROL) -> None:
        self.pipe = root / "pipe"
        self.logs = root / "log"
        self.binary = binary
        self.exe: str | None = None

    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe), "CUDA_MPS_LOG_DIRECTORY": str(self.logs)}

    def _control(self, exe: str, args: list[str], stdin: str | None, timeout: float) -> Any:
        """One call of the control binary, pointed at this daemon's folders."""
        return subprocess.run(
            [exe, *args],
            input=stdin,
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        exe = shutil.which(self.binary)
        if exe is None:
            raise ValueError(
                f"--mps: {self.binary} not found on PATH (it comes with the NVIDIA driver); run without --mps"
            )
        self.pipe.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        r = self._control(exe, ["-d"], None, 60)
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip()
            raise ValueError(f"--mps: the MPS control daemon did not start (exit {r.returncode}): {why}")
        self.exe = exe
        print(f"MPS control daemon started for this run (pipe {self.pipe})", file=sys.stderr)

    def stop(self) -> None:
        if self.exe is None:
            return
        try:
            r = self._control(self.exe, [], "quit\n", 120)
            if r.returncode != 0:
                log.warning("MPS control daemon: quit answered exit %d: %s", r.returncode, r.stderr.strip())
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("MPS control daemon: could not send quit (%s)", e)
        self.exe = None


def run_multi_gpu(
    argv: list[str],
    gpus: str | Sequence[str],
    *,
    worker_cmd: Sequence[str] = (sys.executable, "-m", "runner"),
    prescan: Callable[[Sequence[str]], tuple[Any, int] | None] | None = _default_prescan,
    log_dir: str | None = None,
    poll_s: float = 5.0,
    echo: bool = False,
    engines_per_gpu: int = 1,
    mps: bool = False,
    mps_binary: str = MPS_CONTROL,
) -> int:
    """Run one worker per GPU (``engines_per_gpu`` per GPU) and wait for all; merge their
    summaries. Returns the exit code: 0 when every worker exited 0, else the first non-zero
    worker code (2 for usage errors here). ``mps``: the workers run under a private CUDA MPS
    control daemon (``MpsDaemon``), started first and stopped at the end."""
    try:
        gpu_ids = parse_gpus(gpus)
        logs = Path(log_dir or tempfile.mkdtemp(prefix="runner-workers-"))
        specs = plan_workers(argv, gpu_ids, worker_cmd, engines_per_gpu, lock_dir=str(logs))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    output_dir = option_value(argv, "--output-dir")
    outputs: Any = None
    total_docs = 0
    if prescan is not None:
        try:
            found = prescan(argv)
        except SystemExit as e:  # argparse rejected the arguments: same answer as a single worker
            return int(e.code or EXIT_USAGE)
        except Exception as e:
            log.warning("page-count prescan skipped (%s: %s); each worker scans", type(e).__name__, e)
            found = None
        if found is not None:
            outputs, total_docs = found
    if outputs is None and output_dir:
        from runner.storage import open_storage

        outputs = open_storage(output_dir)
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("runner-engine-start-gpu*.lock.ready.*"):  # a reused --log-dir
        stale.unlink(missing_ok=True)

    daemon = MpsDaemon(logs / "mps", mps_binary) if mps else None
    if daemon is not None:
        try:
            daemon.start()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    t0 = time.perf_counter()
    done_before = _count_done(outputs) if outputs is not None else -1
    procs: list[tuple[WorkerSpec, subprocess.Popen[str], str, threading.Thread, Any]] = []
    stop = threading.Event()

    def _forward(signum: int, _frame: Any) -> None:
        stop.set()
        for _, p, _, _, _ in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, _forward)
    try:
        for spec in specs:
            path = str(logs / f"{spec.name}.log")
            fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed after the worker exits
            env = {**os.environ, **dict(spec.env), **(daemon.env() if daemon is not None else {})}
            p = subprocess.Popen(
                list(spec.argv),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            t = threading.Thread(target=_pump, args=(p.stdout, fh, f"[gpu {spec.gpu}]", echo), daemon=True)
            t.start()
            procs.append((spec, p, path, t, fh))
            print(f"worker {spec.name} on GPU {spec.gpu}: log {path}", file=sys.stderr)
        outcomes: dict[str, WorkerOutcome] = {}
        last = 0.0
        while len(outcomes) < len(procs):
            for spec, p, path, t, fh in procs:
                if spec.name not in outcomes and p.poll() is not None:
                    t.join(timeout=5)
                    fh.close()
                    outcomes[spec.name] = WorkerOutcome(
                        spec, int(p.returncode), time.perf_counter() - t0, path
                    )
                    state = "ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"
                    print(
                        f"worker {spec.name} on GPU {spec.gpu}: {state} after "
                        f"{outcomes[spec.name].seconds:.1f}s",
                        file=sys.stderr,
                    )
                    if p.returncode != 0:
                        sys.stderr.write(_tail(path))
            now = time.perf_counter()
            if now - last >= poll_s and len(outcomes) < len(procs):
                last = now
                done = _count_done(outputs) if outputs is not None else -1
                docs = (
                    f"{done - done_before}/{total_docs} new done markers"
                    if done >= 0 and total_docs
                    else f"{done - done_before} new done markers"
                    if done >= 0
                    else "done markers unreadable"
                )
                print(
                    f"progress: {docs}, workers running {len(procs) - len(outcomes)}/{len(procs)}, "
                    f"failed {sum(o.returncode != 0 for o in outcomes.values())}, {now - t0:.0f}s",
                    file=sys.stderr,
                )
            time.sleep(0.2)
    finally:
        for _spec, p, _, _, fh in procs:
            if p.poll() is None:  # the parent is leaving (exception or signal): take the workers along
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            if not fh.closed:
                fh.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if daemon is not None:
            daemon.stop()
    wall = time.perf_counter() - t0
    code = _merge_and_write(outputs, specs, outcomes, wall, gpu_ids)
    failed = [o for o in outcomes.values() if o.returncode != 0]
    if failed:
        return next(o.returncode for o in sorted(failed, key=lambda o: o.spec.shard_index))
    return code


def _merge_and_write(
    outputs: Any, specs: list[WorkerSpec], outcomes: dict[str, WorkerOutcome], wall: float, gpus: list[str]
) -> int:
    if outputs is None:
        return EXIT_OK
    parts: dict[str, dict[str, Any]] = {}
    for spec in specs:
        try:
            if outputs.exists(spec.summary_name()):
                parts[spec.name] = json.loads(outputs.read_bytes(spec.summary_name()))
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("cannot read %s: %s", spec.summary_name(), e)
    workers = [
        {
            "shard": o.spec.name,
            "gpu": o.spec.gpu,
            "exit_code": o.returncode,
            "seconds": round(o.seconds, 3),
            "log": o.log_path,
            "summary": o.spec.summary_name() if o.spec.name in parts else None,
        }
        for o in sorted(outcomes.values(), key=lambda o: o.spec.shard_index)
    ]
    merged = merge_summaries(parts, wall, {"gpus": list(gpus), "workers": workers})
    try:
        outputs.write_bytes(SUMMARY_NAME, dumps(merged))  # escaped like every JSON output
    except (OSError, RuntimeError) as e:
        print(f"error: cannot write {SUMMARY_NAME}: {e}", file=sys.stderr)
        return EXIT_FAILED
    files = merged.get("files", {})
    print(
        f"merged {len(parts)}/{len(specs)} shard summaries into {outputs.uri(SUMMARY_NAME)}: "
        f"{files.get('ok', 0)} ok, {files.get('failed', 0)} failed, {files.get('skipped', 0)} skipped, "
        f"{merged['pages_total']} pages, {merged['pages_per_s']:.2f} pages/s "
        f"({merged['pages_per_s_incl_startup']:.2f} incl. start-up over {wall:.1f}s)",
        file=sys.stderr,
    )
    return EXIT_OK
