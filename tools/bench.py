"""Throughput benchmark (tooling): the product against the seeds' baseline, in one command.

Workload (``../shared/PERF.md``): generated A4 PDFs rendered at 144 dpi, Gundam mode, 1000 forced
output tokens per page (``ignore_eos``), repetition guard on (30/90), fp8 KV cache, dummy weights.

Runs, each in its own process so GPU memory is released in between:
- ``product``: the product's CLI (``run_pdf_ocr_vllm.py --engine vllm``), retries off;
  or, with ``--product engine``, the product's render pool + ``VllmEngine`` driven by a minimal
  loop here (useful to isolate the engine from the scheduler; it also measures the guard's cost
  by running the same pages again with the guard off in the same engine);
- ``baseline``: render every page first, then one ``LLM.generate`` with vLLM's own processor
  and its per-request ``NGramPerReqLogitsProcessor``.

Throughput = pages / (last Markdown written - engine ready); engine start-up is reported apart.
GPU busy fraction (NVML utilisation), GPU memory peak and host CPU are sampled while each runs.
Prints one JSON line and appends it to ``tmp_pdf_runs/benchmarks.jsonl`` (``--jsonl``).

    python tools/bench.py --model-dir .gpu_carry/models/deepseek-ocr --pages 256

Several GPUs (issues 9 and 10), ``--scale 1,gpus,ray``: the product CLI on one GPU, then with the
local launcher ``--gpus 0,1``, then ``--executor ray`` with one engine actor per GPU, on the same
generated PDFs (``--pages-per-gpu`` pages per GPU: the one-GPU run gets K pages, the N-GPU runs
N*K, so every GPU sees the same work and the same ramp-up and tail). One JSON line per run with
``gpus``, ``executor``, ``scaling`` (pages/s over the one-GPU run's), ``efficiency`` (scaling / N)
and, for Ray, ``ray_vs_gpus``. The runs can be separate commands (``--scale 1``, then ``--scale gpus``, ...):
results are kept in ``<work-dir>/scale_results.json`` and later runs are compared with earlier ones
of the same workload. With several engines the start-up lines come from the workers (the
launcher keeps their stdout in per-worker logs; Ray forwards its actors' lines), so t0 is read
from the run's ``--log-file``, where every worker's pipeline writes ``engine vllm started in X s``
with a wall-clock time stamp (Ray: once, when all actors are ready). Definitions:

- ``pages_per_s`` = pages / (last Markdown - FIRST engine ready): start-up skew between the
  engines counts against the N-GPU run, so ``scaling`` cannot be inflated by it;
- ``pages_per_s_last_ready`` = pages / (last Markdown - LAST engine ready), an upper bound
  (pages may finish on an early engine before t0); ``ray_vs_gpus`` divides Ray's rate by this
  one of the ``--gpus`` run, which is conservative against Ray (Ray starts no page before all its
  actors are ready, so its two definitions coincide);
- ``summary_pages_per_s``: the product's own number (launcher: all pages / the longest worker's
  processing time after its own start-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
A4_PT = (595.0, 842.0)
RESULT_TAG = "BENCH_RESULT "
READY_RE = re.compile(r"vLLM engine ready in ([0-9.]+) s")
# The pipeline's line after each engine start (log file format "%(asctime)s %(levelname)s %(name)s: ...").
STARTED_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO runner[\w.]*: engine \S+ started in ([0-9.]+) s"
)
WORKER_LOG_RE = re.compile(r"worker (shard-\d+-of-\d+) on GPU (\S+): log (\S+)")
SCALE_RUNS = ("1", "gpus", "ray")
SCALE_TARGETS = {"scaling": 1.9, "ray_vs_gpus": 0.95}  # PERF.md / issues 9 and 10

_WORDS = tuple(
    [
        "the",
        "model",
        "reads",
        "every",
        "page",
        "of",
        "the",
        "document",
        "and",
        "writes",
        "markdown",
        "with",
        "tables",
        "figures",
        "and",
        "formulas",
        "while",
        "the",
        "benchmark",
        "measures",
        "how",
        "many",
        "pages",
        "per",
        "second",
        "reach",
        "the",
        "disk",
    ]
)


# -- workload ------------------------------------------------------------------------------------
def make_pdfs(folder: Path, pages: int, per_pdf: int = 32, workers: int = 1) -> list[Path]:
    """Text-dense A4 PDFs (a title, two paragraphs blocks and a small table per page).

    Deterministic: document ``k`` is the same whatever ``pages`` is, so the first documents of a
    large set equal a smaller set. ``workers`` > 1 builds the documents in parallel processes."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, int, int]] = []
    done = 0
    while done < pages:
        n = min(per_pdf, pages - done)
        k = len(jobs)
        jobs.append((str(folder / f"bench_{k:03d}.pdf"), k, n))
        done += n
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
            list(ex.map(_make_pdf, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _make_pdf(*job)
    return [Path(j[0]) for j in jobs]


def _make_pdf(path: str, k: int, n: int) -> None:
    import pymupdf

    doc = pymupdf.open()
    for i in range(n):
        page = doc.new_page(width=A4_PT[0], height=A4_PT[1])
        page.insert_text((60, 70), f"Benchmark document {k} - page {i + 1}", fontsize=16)
        words = [_WORDS[(i * 7 + j * 3 + k) % len(_WORDS)] for j in range(900)]
        page.insert_textbox(pymupdf.Rect(60, 90, 535, 470), " ".join(words[:450]), fontsize=9)
        for r in range(6):
            for c in range(4):
                x, y = 60 + c * 118, 490 + r * 20
                page.draw_rect(pymupdf.Rect(x, y, x + 118, y + 20), width=0.5)
                page.insert_text((x + 4, y + 14), f"r{r}c{c} {(r * 4 + c) * (i + 1)}", fontsize=9)
        page.insert_textbox(pymupdf.Rect(60, 620, 535, 800), " ".join(words[450:]), fontsize=9)
    doc.save(path)
    doc.close()


#: vLLM's share for the seeds' baseline and the engine-mode run when --gpu-memory-utilization is
#: not given (the CLI product then keeps its own default)
BASELINE_UTIL = 0.9

# -- monitoring ----------------------------------------------------------------------------------
TIMELINE_S = 5  # seconds per bucket of the busy timeline


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _timeline(
    points: list[tuple[float, float]], t0: float, reduce: Callable[[list[float]], float]
) -> list[float | None]:
    """``reduce`` of the values of each TIMELINE_S bucket after ``t0``; None for an empty one."""
    buckets: dict[int, list[float]] = {}
    for t, v in points:
        buckets.setdefault(int((t - t0) // TIMELINE_S), []).append(v)
    return [reduce(buckets[i]) if i in buckets else None for i in range(max(buckets) + 1)] if buckets else []


class Monitor:
    """Samples GPU utilisation/memory (NVML) and host CPU (psutil) in a thread.

    ``devices``: NVML indices to sample; default the first GPU of ``CUDA_VISIBLE_DEVICES`` (or 0).
    With several devices the busy fraction is the mean over devices and samples, the memory peak
    the largest device's, and both also come per device."""

    def __init__(self, period: float = 0.25, devices: Sequence[int] | None = None) -> None:
        self.period = period
        self.devices = list(devices) if devices else None
        self.samples: list[tuple[float, list[float], list[float], float]] = []
        #: peak GPU memory per process (NVML), "pid name" -> GiB: which process holds what
        self.proc_peaks: dict[str, float] = {}
        self._proc_names: dict[int, str] = {}  # pid -> "pid cmdline", read once per process
        #: (time, "pid name", GiB) per sample: the per-process peak of the run alone, not start-up
        self.proc_samples: list[tuple[float, str, float]] = []
        #: (time, host memory used GiB, of which shared memory GiB: /dev/shm pages and Ray's
        #: object store live there) per sample
        self.host_mem: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(timeout=5)

    def _run(self) -> None:
        import psutil

        handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = self.devices or [int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])]
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
        except Exception:  # NVML missing (CPU box): record CPU only
            handles = []
        psutil.cpu_percent(None)
        while not self._stop.wait(self.period):
            utils: list[float] = []
            mems: list[float] = []
            if handles:
                import pynvml

                for h in handles:
                    utils.append(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu))
                    mems.append(pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30)
                    self._sample_processes(pynvml, h, psutil)
            now = time.time()
            self.samples.append((now, utils, mems, psutil.cpu_percent(None)))
            vm = psutil.virtual_memory()
            self.host_mem.append((now, vm.used / 2**30, getattr(vm, "shared", 0) / 2**30))

    def _sample_processes(self, pynvml: Any, handle: Any, psutil: Any) -> None:
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            return
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            if not used:
                continue
            key = self._proc_names.get(p.pid)
            if key is None:
                try:
                    name = " ".join(psutil.Process(p.pid).cmdline()[:2])[-60:]
                except Exception:
                    name = "?"
                key = self._proc_names[p.pid] = f"{p.pid} {name}"
            gib = round(used / 2**30, 2)
            self.proc_peaks[key] = max(self.proc_peaks.get(key, 0.0), gib)
            self.proc_samples.append((time.time(), key, gib))

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        utils = [sum(x[1]) / len(x[1]) for x in s if x[1]]
        mems = [max(x[2]) for x in self.samples if x[2]]
        cpus = [x[3] for x in s]
        ncpu = os.cpu_count() or 1
        out: dict[str, Any] = {
            "gpu_busy_fraction": round(sum(utils) / len(utils) / 100, 3) if utils else None,
            "gpu_mem_peak_gib": round(max(mems), 2) if mems else None,
            "host_cpu_percent": round(sum(cpus) / len(cpus), 1) if cpus else None,
            "host_cores_busy": round(sum(cpus) / len(cpus) * ncpu / 100, 1) if cpus else None,
            "host_cores": ncpu,
        }
        # Where the peak happens (issue 11's capped runs): what the device held before our
        # processes, the peak during start-up (samples before t0) and during the run itself.
        if mems:
            before = [max(x[2]) for x in self.samples if x[2] and x[0] < t0]
            out["gpu_mem_first_sample_gib"] = round(mems[0], 2)
            out["gpu_mem_peak_start_up_gib"] = round(max(before), 2) if before else None
            run = [max(x[2]) for x in s if x[2]]
            out["gpu_mem_peak_run_gib"] = round(max(run), 2) if run else None
        if self.proc_peaks:
            out["gpu_mem_peak_gib_per_process"] = dict(self.proc_peaks)
            run_peaks: dict[str, float] = {}
            for t, key, gib in self.proc_samples:
                if t0 <= t <= t1:
                    run_peaks[key] = max(run_peaks.get(key, 0.0), gib)
            out["gpu_mem_peak_gib_per_process_run"] = run_peaks
        # Busy fraction per TIMELINE_S of the run: a run of few waves (every page forced to the
        # same length) has ramps and tails that the mean hides (GPU session 8).
        if utils:
            busy = _timeline([(x[0], sum(x[1]) / len(x[1])) for x in s if x[1]], t0, _mean)
            out["gpu_busy_timeline"] = {
                "bucket_s": TIMELINE_S,
                "busy": [None if v is None else round(v / 100, 2) for v in busy],
            }
        # Host CPU and memory per TIMELINE_S too: whether a ramp is CPU-bound, and whether pages
        # held in shared memory (or Ray's object store) grow with the in-flight window.
        if cpus:
            cores = _timeline([(x[0], x[3]) for x in s], t0, _mean)
            out["host_cores_busy_timeline"] = [None if v is None else round(v * ncpu / 100, 1) for v in cores]
        hm = [x for x in self.host_mem if t0 <= x[0] <= t1]
        if hm:
            for i, name in ((1, "used"), (2, "shared")):
                out[f"host_mem_{name}_peak_gib"] = round(max(x[i] for x in hm), 1)
                tl = _timeline([(x[0], x[i]) for x in hm], t0, max)
                out[f"host_mem_{name}_timeline_gib"] = [None if v is None else round(v, 1) for v in tl]
        ndev = max((len(x[1]) for x in self.samples), default=0)
        if ndev > 1:
            per = [x[1] for x in s if len(x[1]) == ndev]
            out["gpu_busy_fraction_per_gpu"] = [
                round(sum(u[i] for u in per) / len(per) / 100, 3) if per else None for i in range(ndev)
            ]
            out["gpu_mem_peak_gib_per_gpu"] = [
                round(max(x[2][i] for x in self.samples if len(x[2]) == ndev), 2) for i in range(ndev)
            ]
        return out


# -- children ------------------------------------------------------------------------------------
def _emit(result: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


def child_baseline(a: argparse.Namespace) -> None:
    """The seeds' approach: render all pages, then one LLM.generate with upstream's processor/guard."""
    import pymupdf
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor

    t_s = time.perf_counter()
    llm = LLM(
        model=a.model_dir,
        tokenizer=a.model_dir,
        load_format="dummy",
        kv_cache_dtype=a.kv_cache_dtype,
        max_num_seqs=a.max_num_seqs,
        max_model_len=8192,
        limit_mm_per_prompt={"image": 1},
        logits_processors=[NGramPerReqLogitsProcessor],
        gpu_memory_utilization=a.gpu_memory_utilization or BASELINE_UTIL,
        seed=0,
        trust_remote_code=False,
        disable_log_stats=True,
    )
    tok = llm.get_tokenizer()
    wl = [tok.convert_tokens_to_ids(t) for t in ("<td>", "</td>")]
    guard_args = {"ngram_size": 30, "window_size": 90, "whitelist_token_ids": wl}
    if a.warmup:  # the same warm-up as the product's engine start-up, so the ratio is fair
        n_pages = 0
        for p in Path(a.pdf_dir).glob("*.pdf"):
            with pymupdf.open(str(p)) as d:
                n_pages += d.page_count
        white = Image.new("RGB", (1190, 1684), "white")
        llm.generate(
            [
                {
                    "prompt": PROMPT,
                    "multi_modal_data": {"image": white},
                    "multi_modal_uuids": {"image": [f"warmup-{i}"]},
                }
                # the batch sizes it will run (its pages), not more: each warm-up page goes
                # through upstream's serial processor (~0.15 s), which only lengthens start-up
                for i in range(min(a.max_num_seqs, 512, n_pages))
            ],
            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, extra_args=guard_args),
            use_tqdm=False,
        )
    startup = time.perf_counter() - t_s
    t0 = time.time()
    pdfs = sorted(Path(a.pdf_dir).glob("*.pdf"))
    prompts, owners = [], []
    for p in pdfs:
        doc = pymupdf.open(str(p))
        for i in range(doc.page_count):
            pix = doc.load_page(i).get_pixmap(dpi=int(a.dpi), alpha=False)
            img = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
            prompts.append({"prompt": PROMPT, "multi_modal_data": {"image": img}})
            owners.append(p.stem)
        doc.close()
    t_render = time.time() - t0
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=a.max_tokens,
        ignore_eos=True,
        skip_special_tokens=False,
        extra_args=guard_args,
    )
    outs = llm.generate(prompts, sp, use_tqdm=False)
    texts: dict[str, list[str]] = {}
    ntok = 0
    for o, stem in zip(outs, owners, strict=True):
        texts.setdefault(stem, []).append(o.outputs[0].text)
        ntok += len(o.outputs[0].token_ids)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stem, parts in texts.items():
        (out / f"{stem}.md").write_text("\n\n".join(parts), encoding="utf-8")
    t1 = time.time()
    _emit(
        {
            "pages": len(prompts),
            "t0": t0,
            "t1": t1,
            "startup_s": round(startup, 1),
            "render_s": round(t_render, 2),
            "output_tokens": ntok,
        }
    )


def child_engine(a: argparse.Namespace) -> None:
    """The product's render pool + VllmEngine, driven by a minimal loop (no retries, no postprocess)."""
    from runner.config import EngineConfig, RunConfig
    from runner.engines.vllm_engine import VllmEngine
    from runner.records import PageRequest
    from runner.render import OpenTask, RenderPool, RenderTask

    pdfs = sorted(str(p) for p in Path(a.pdf_dir).glob("*.pdf"))
    ec = EngineConfig(
        model=a.model_dir,
        load_format="dummy",
        ignore_eos=True,
        max_tokens=a.max_tokens,
        kv_cache_dtype=a.kv_cache_dtype,
        max_num_seqs=a.max_num_seqs,
        guard=True,
        gpu_memory_utilization=a.gpu_memory_utilization or BASELINE_UTIL,
    )
    cfg = RunConfig(
        inputs=tuple(pdfs), input_root=a.pdf_dir, output_dir=a.out_dir, engine="vllm", engine_config=ec
    )
    eng = VllmEngine(cfg)
    eng.start()
    results: list[dict[str, Any]] = []
    guard_args = dict(eng._guard_args)
    # Round 0 is the measured product run (cold, as a CLI run would be). With --guard-ab (or
    # --guard-plan) the same engine then runs the pages again, warm: guard off, guard on (device,
    # the product's), guard on with the host (numpy) implementation: the guard's cost and the two
    # backends.
    host_args = {**guard_args, "guard_backend": "host"}
    plan = [("device", guard_args)]
    by_label = {"off": {}, "device": guard_args, "host": host_args}
    # warm rounds in this order, e.g. off,device,off,device: the noise shows; --guard-ab is one each
    guard_plan = a.guard_plan or ("off,device,host" if a.guard_ab else "")
    if guard_plan:
        plan += [(x, by_label[x]) for x in guard_plan.split(",")]
    caps = [int(x) for x in a.round_caps.split(",")] if a.round_caps else []
    with RenderPool(workers=a.render_workers) as pool:
        for rnd, (label, args) in enumerate(plan + [("device", guard_args)] * len(caps)):
            cap = caps[rnd - len(plan)] if rnd >= len(plan) else 1 << 30
            eng._guard_args = args
            results.append(_engine_round(a, eng, pool, pdfs, rnd, OpenTask, RenderTask, PageRequest, cap=cap))
            results[-1]["guard"] = label
            results[-1]["cap"] = min(cap, a.max_num_seqs)
            print(
                f"ROUND {rnd} guard={label} in-flight cap={results[-1]['cap']} pages/s="
                f"{results[-1]['pages'] / (results[-1]['t1'] - results[-1]['t0']):.3f}",
                flush=True,
            )
    stats = dict(eng.stats)
    eng.close()
    r = results[0]
    r["startup_s"] = round(eng.startup_seconds, 1)
    r["engine_stats"] = stats
    if len(results) > 1:
        r["round_pages_per_s"] = [round(x["pages"] / (x["t1"] - x["t0"]), 3) for x in results]
        r["round_guard"] = [x["guard"] for x in results]
        r["round_cap"] = [x["cap"] for x in results]
    if guard_plan:
        # the plan's warm rounds only: --round-caps rounds after them measure the in-flight cap
        r.update(guard_summary(r["round_guard"][1 : len(plan)], r["round_pages_per_s"][1 : len(plan)]))
    _emit(r)


def guard_summary(labels: list[str], rates: list[float]) -> dict[str, Any]:
    """Mean pages/s per guard setting over warm rounds, and each guard's cost against ``off``."""
    warm: dict[str, list[float]] = {}
    for x, v in zip(labels, rates, strict=True):
        warm.setdefault(x, []).append(v)
    mean = {k: round(sum(v) / len(v), 3) for k, v in warm.items()}
    out: dict[str, Any] = {"warm_mean_pages_per_s": mean}
    if "off" in mean:
        out["noguard_pages_per_s"] = mean["off"]
        for k in ("device", "host"):
            if k in mean:
                out[f"guard_cost_{k}"] = round(1 - mean[k] / mean["off"], 3)
        if "device" in mean:
            out["warm_guard_pages_per_s"] = mean["device"]
        if "host" in mean:
            out["warm_host_guard_pages_per_s"] = mean["host"]
    return out


def _engine_round(
    a: argparse.Namespace,
    eng: Any,
    pool: Any,
    pdfs: list[str],
    rnd: int,
    OpenTask: Any,
    RenderTask: Any,
    PageRequest: Any,
    cap: int = 1 << 30,
) -> dict[str, Any]:
    t0 = time.time()
    for i, p in enumerate(pdfs):
        pool.submit(OpenTask(i, p, p))
    counts: dict[str, int] = {}
    while len(counts) < len(pdfs):
        for res in pool.collect(0.1):
            counts[res.task.doc_key] = res.payload["page_count"]
    hook = eng.worker_hook
    tid = 0
    for p in pdfs:
        for i in range(counts[p]):
            tid += 1
            pool.submit(RenderTask(tid, p, p, i, a.dpi, hook=hook))
    total = sum(counts.values())
    waiting: list[Any] = []  # rendered pages not yet submitted (only when a round caps in-flight)
    texts: dict[str, dict[int, str]] = {p: {} for p in pdfs}
    done = 0
    depth: list[int] = []
    ntok = 0
    last = time.time()
    while done < total:
        if time.time() - last > a.stall_s:  # nothing came back for a long time: record why, give up
            import faulthandler

            print(
                f"STALL round {rnd}: {done}/{total} done, engine pending {eng.pending()}, "
                f"render busy {pool.busy()}",
                flush=True,
            )
            faulthandler.dump_traceback(all_threads=True)
            break
        for res in pool.collect(0.0 if eng.pending() else 0.05):
            waiting.append(res.payload)
        while waiting and eng.pending() < cap:
            img = waiting.pop(0)
            rid = f"r{rnd}-{img.doc_key}-{img.page_index}"
            # a per-round doc key keeps vLLM's prefix cache from serving round 2 from round 1
            eng.submit([PageRequest(rid, dataclasses.replace(img, doc_key=f"{img.doc_key}#{rnd}"), "clean")])
        for o in eng.poll(0.01):
            _, _, rest = o.request_id.partition("-")
            doc, _, page = rest.rpartition("-")
            texts[doc][int(page)] = o.text if not o.error else f"[[{o.error}]]"
            ntok += o.output_tokens or 0
            done += 1
            last = time.time()
            if len(texts[doc]) == counts[doc]:
                stem = Path(doc).stem
                out = Path(a.out_dir) / f"{stem}.r{rnd}.md"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("\n\n".join(texts[doc][k] for k in sorted(texts[doc])), encoding="utf-8")
        depth.append(eng.pending())
    t1 = time.time()
    return {
        "pages": done,
        "t0": t0,
        "t1": t1,
        "output_tokens": ntok,
        "mean_in_flight": round(sum(depth) / max(1, len(depth)), 1),
    }


# -- parent --------------------------------------------------------------------------------------
def _run_child(
    argv: list[str],
    log_path: Path,
    env: dict[str, str],
    timeout: float | None = None,
    term_grace: float | None = None,
) -> tuple[dict[str, Any], list[tuple[float, str]]]:
    """Run ``argv``, keep its output with arrival times; the ``BENCH_RESULT`` line is the result.
    After ``timeout`` s the process group is killed; with ``term_grace`` it first gets SIGTERM and
    that long to exit (the ``--gpus`` launcher forwards SIGTERM to its workers, which run in their
    own sessions and would survive a SIGKILL of the launcher's group)."""
    killed: list[bool] = []

    def _kill(proc: subprocess.Popen[str]) -> None:
        killed.append(True)
        try:
            if term_grace:
                os.killpg(proc.pid, signal.SIGTERM)
                end = time.time() + term_grace
                while proc.poll() is None and time.time() < end:
                    time.sleep(0.5)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    lines: list[tuple[float, str]] = []
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(ROOT),
            bufsize=1,
            start_new_session=True,
        )
        assert proc.stdout is not None
        timer = None
        if timeout:
            timer = threading.Timer(timeout, _kill, args=(proc,))
            timer.daemon = True
            timer.start()
        for line in proc.stdout:
            lines.append((time.time(), line))
            logf.write(line)
        proc.wait()
        if timer is not None:
            timer.cancel()
    res = {}
    for _, line in lines:
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG) :])
    res["returncode"] = proc.returncode
    if killed:
        res["timed_out"] = True
    return res, lines


def cli_argv(
    a: argparse.Namespace,
    pdf_dir: str,
    prod_out: Path,
    log_file: Path,
    *,
    gpus: str | None = None,
    executor: str = "local",
    engines: int = 1,
    render_workers: int | None = None,
) -> list[str]:
    """The product CLI's command line. ``gpus``: the local launcher (one worker per GPU, each
    with ``render_workers`` render processes and the product's own in-flight window, or
    ``--batch-pages`` when given); ``executor="ray"``: ``engines`` engine actors sharing one
    window sized like the workers' windows together (a batch running and a batch queued each)."""
    rw = a.render_workers if render_workers is None else render_workers
    window = getattr(a, "batch_pages", None)
    if executor == "ray":
        window = engines * (window or 2 * a.max_num_seqs)
    argv = [
        sys.executable,
        "run_pdf_ocr_vllm.py",
        "--input-dir",
        pdf_dir,
        "--output-dir",
        str(prod_out),
        "--engine",
        "vllm",
        "--model",
        a.model_dir,
        "--load-format",
        "dummy",
        "--ignore-eos",
        "--max-tokens",
        str(a.max_tokens),
        "--kv-cache-dtype",
        a.kv_cache_dtype,
        "--retries",
        "0",
        "--no-large-pass",
        "--max-num-seqs",
        str(a.max_num_seqs),
        "--dpi",
        str(a.dpi),
        # only when given: otherwise the product's own default, which for --engines-per-gpu K is
        # each engine's measured share (profiles.shared_gpu_utilization), not 0.9 / K
        *(["--gpu-memory-utilization", str(a.gpu_memory_utilization)] if a.gpu_memory_utilization else []),
        "--progress",
        "log",
        "--force",
        "--render-workers",
        str(rw),
        *(["--batch-pages", str(window)] if window else []),
        "--log-file",
        str(log_file),
    ]
    if gpus:
        argv += ["--gpus", gpus]
    if executor == "ray":
        argv += ["--executor", "ray", "--ray-engine-actors", str(engines), "--ray-render-tasks", str(rw)]
    return [*argv, *a.cli_extra]


def _log_time(asctime: str, millis: str) -> float:
    """Wall-clock seconds of the logging module's local-time ``asctime`` ("%Y-%m-%d %H:%M:%S", ms)."""
    return time.mktime(time.strptime(asctime, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def engine_ready_times(log_file: Path) -> list[tuple[float, float]]:
    """(wall-clock time, start-up seconds) of every ``engine X started in Y s`` line the pipeline
    wrote to ``log_file`` (one per worker with ``--gpus``, one per engine pool with Ray), sorted.
    The time stamps are the logging module's local-time ``asctime`` (millisecond resolution)."""
    out: list[tuple[float, float]] = []
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = STARTED_RE.match(line)
        if m:
            out.append((_log_time(m.group(1), m.group(2)), float(m.group(3))))
    return sorted(out)


HEARTBEAT_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO \S+: vllm engine: pending=(\d+) .*?steps=(\d+)"
)


def step_heartbeats(log_file: Path) -> dict[str, Any] | None:
    """The feeding thread's heartbeats (``vllm engine: pending=N ... steps=S`` every ~10 s while
    pages are pending) in one engine's log: the engine's ms per step between beats (median,
    fastest, slowest), and the ``[seconds since the first beat, ms/step, pending]`` series.
    Where a step's time goes without a profiler: prefill steps are long, decode steps short, a
    stall shows as a beat without steps. None when the log has fewer than two beats."""
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    beats: list[tuple[float, int, int]] = []
    for line in text.splitlines():
        m = HEARTBEAT_RE.match(line)
        if m:
            beats.append((_log_time(m.group(1), m.group(2)), int(m.group(4)), int(m.group(3))))
    if len(beats) < 2:
        return None
    series: list[list[float]] = []
    for (t_a, s_a, _), (t_b, s_b, pend) in itertools.pairwise(beats):
        ms = (t_b - t_a) * 1e3 / (s_b - s_a) if s_b > s_a else float("inf")
        series.append([round(t_b - beats[0][0], 1), round(ms, 1), pend])
    finite = sorted(x[1] for x in series if x[1] != float("inf"))
    return {
        "beats": len(beats),
        "steps": beats[-1][1],
        "ms_per_step_median": finite[len(finite) // 2] if finite else None,
        "ms_per_step_min": finite[0] if finite else None,
        "ms_per_step_max": finite[-1] if finite else None,
        "beats_without_steps": sum(1 for x in series if x[1] == float("inf")),
        "series": [x if x[1] != float("inf") else [x[0], None, x[2]] for x in series],
    }


def ready_window(
    readies: Sequence[tuple[float, float]], starts: int, t1: float | None, pages: int
) -> dict[str, Any]:
    """t0 (FIRST engine ready), ``t0_last_ready``, start-up figures and the last-ready rate for a
    run that logs ``starts`` engine start-ups (later lines are restarts and are ignored)."""
    first = sorted(readies)[: max(1, starts)]
    out: dict[str, Any] = {"engines_ready": len(first)}
    if not first or t1 is None:
        return out
    t0, t0_last = first[0][0], first[-1][0]
    out.update(
        t0=t0,
        t0_last_ready=t0_last,
        t1=t1,
        startup_s=round(first[0][1], 1),
        startup_max_s=round(max(x[1] for x in first), 1),
        ready_skew_s=round(t0_last - t0, 2),
    )
    if t1 > t0_last:
        out["pages_per_s_last_ready"] = round(pages / (t1 - t0_last), 3)
    return out


def _copy_worker_logs(lines: Sequence[tuple[float, str]], dest: Path) -> list[str]:
    """The launcher names each worker's log on stderr; keep a copy next to the run's logs."""
    copied: list[str] = []
    for _, line in lines:
        m = WORKER_LOG_RE.search(line)
        if m and Path(m.group(3)).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / f"{m.group(1)}.log"
            shutil.copy(m.group(3), target)
            copied.append(str(target))
    return sorted(set(copied))


_SUMMARY_KEYS = (
    "wall_seconds",
    "engine_startup_s",
    "pages_per_s",
    "pages",
    "pages_total",
    "loop_rate",
    "engine_restarts",
)
_SUMMARY_EXTRA = ("executor", "parent_wall_seconds", "pages_per_s_incl_startup", "per_shard", "ray")


def run_product_cli(
    a: argparse.Namespace,
    out: Path,
    env: dict[str, str],
    *,
    pdf_dir: str | None = None,
    pages: int | None = None,
    gpus: str | None = None,
    executor: str = "local",
    engines: int = 1,
    render_workers: int | None = None,
    devices: Sequence[int] | None = None,
    timeout: float | None = None,
) -> tuple[dict[str, Any], Monitor]:
    """One product CLI run. One engine (no ``gpus``, local executor): t0 = arrival of the
    ``vLLM engine ready`` line on the CLI's output, as always. Several engines: see
    ``ready_window`` (t0 = first engine ready, read from the shared ``--log-file``)."""
    prod_out = out / "product"
    log_file = out / "product_run.log"
    multi = bool(gpus) or executor != "local"
    out.mkdir(parents=True, exist_ok=True)
    if multi:
        log_file.unlink(missing_ok=True)  # the workers append to it; older start-up lines would count
    argv = cli_argv(
        a,
        pdf_dir or a.pdf_dir,
        prod_out,
        log_file,
        gpus=gpus,
        executor=executor,
        engines=engines,
        render_workers=render_workers,
    )
    with Monitor(devices=devices) as mon:
        res, lines = _run_child(
            argv, out / "product.log", env, timeout=timeout, term_grace=30.0 if timeout else None
        )
    mds = list(prod_out.rglob("*.md"))
    res["pages"] = a.pages if pages is None else pages
    if not multi:
        ready = [(t, m) for t, line in lines if (m := READY_RE.search(line))]
        if ready and mds:
            res["t0"] = ready[0][0]
            res["startup_s"] = float(ready[0][1].group(1))
            res["t1"] = max(p.stat().st_mtime for p in mds)
    else:
        t1 = max(p.stat().st_mtime for p in mds) if mds else None
        starts = 1 if executor == "ray" else engines
        res.update(ready_window(engine_ready_times(log_file), starts, t1, res["pages"]))
        res["expected_engine_starts"] = starts
        res["worker_logs"] = _copy_worker_logs(lines, out / "worker_logs")
    res["md_files"] = len(mds)
    res["argv"] = " ".join(argv[1:])
    logs = [Path(p) for p in res.get("worker_logs", [])] or [log_file]
    beats = {p.stem: hb for p in logs if (hb := step_heartbeats(p)) is not None}
    if beats:
        res["step_heartbeats"] = beats
    summary = prod_out / "_run_summary.json"
    if summary.is_file():
        sm = json.loads(summary.read_text())
        res["pipeline_summary"] = {k: sm.get(k) for k in _SUMMARY_KEYS}
        res["pipeline_summary"].update({k: sm[k] for k in _SUMMARY_EXTRA if k in sm})
    return res, mon


# -- several GPUs (issues 9 and 10) --------------------------------------------------------------
def _gpu_list(spec: str | None) -> list[str]:
    return [g.strip() for g in (spec or "0,1").split(",") if g.strip()]


def scale_run_kwargs(
    a: argparse.Namespace, run: str, ids: Sequence[str], env: dict[str, str]
) -> dict[str, Any]:
    """``run_product_cli`` arguments for one scale run: ``1`` (the first GPU alone, the plain
    CLI), ``gpus`` (the local launcher over ``ids``), ``ray`` (one Ray engine actor per id).
    Render processes: ``--render-workers`` in all for the machine, split between the workers."""
    n = len(ids)
    devices = [int(g) for g in ids] if all(g.isdigit() for g in ids) else None
    if run == "1":
        return {
            "env": {**env, "CUDA_VISIBLE_DEVICES": ids[0]},
            "engines": 1,
            "render_workers": a.render_workers,
            "devices": devices[:1] if devices else None,
        }
    if run == "gpus":
        return {
            "env": env,
            "gpus": ",".join(ids),
            "engines": n,
            "render_workers": max(2, a.render_workers // n),
            "devices": devices,
        }
    if run == "ray":
        return {
            "env": {**env, "CUDA_VISIBLE_DEVICES": ",".join(ids), "RAY_USAGE_STATS_ENABLED": "0"},
            "executor": "ray",
            "engines": n,
            "render_workers": a.render_workers,
            "devices": devices,
        }
    raise ValueError(f"unknown scale run {run!r} (one of {', '.join(SCALE_RUNS)})")


def scale_pdfs(work: Path, pages: int, workers: int = 1, per_pdf: int = 32) -> Path:
    """``work/pdfs_<pages>``, generated once (make_pdfs is deterministic: the one-GPU set is the
    first documents of the N-GPU set)."""
    d = work / f"pdfs_{pages}"
    marker = d / ".complete"
    if not marker.is_file():
        if d.exists():
            shutil.rmtree(d)
        make_pdfs(d, pages, per_pdf, workers)
        marker.write_text(f"{pages} pages, {per_pdf} per PDF\n")
    return d


def scale_line(
    run: str,
    res: dict[str, Any],
    previous: dict[str, dict[str, Any]],
    *,
    n_gpus: int,
    pages: int,
    docs: int,
) -> dict[str, Any]:
    """The measured fields of one scale run's JSON line (``gpus``, ``executor``, rates, start-up,
    ``scaling`` vs the one-GPU run and ``ray_vs_gpus`` vs the launcher run found in ``previous``).
    A run that failed, timed out, or wrote fewer Markdown files than documents gets no rate."""
    multi = run != "1"
    complete = (
        res.get("returncode") == 0
        and not res.get("timed_out")
        and res.get("md_files") == docs
        and (not multi or res.get("engines_ready", 0) >= res.get("expected_engine_starts", 1))
    )
    t0, t1 = res.get("t0"), res.get("t1")
    pps = round(pages / (t1 - t0), 3) if complete and t0 is not None and t1 is not None and t1 > t0 else None
    summary = res.get("pipeline_summary") or {}
    line: dict[str, Any] = {
        "gpus": n_gpus if multi else 1,
        "executor": "ray" if run == "ray" else "local",
        "launcher": {"1": "none (plain CLI)", "gpus": "--gpus", "ray": "--executor ray"}[run],
        "pages": pages,
        "complete": complete,
        "pages_per_s": pps,
        "pages_per_s_last_ready": (res.get("pages_per_s_last_ready") if complete else None) if multi else pps,
        "summary_pages_per_s": summary.get("pages_per_s"),
        "engine_startup_s": res.get("startup_s"),
        "engine_startup_max_s": res.get("startup_max_s", res.get("startup_s")),
        "ready_skew_s": res.get("ready_skew_s", 0.0),
        "t0_definition": (
            "first engine ready (launcher workers' 'engine started' log lines)"
            if run == "gpus"
            else "all Ray engine actors ready (pipeline 'engine started' log line)"
            if run == "ray"
            else "vLLM engine ready line on the CLI output"
        ),
        "t1_definition": "last Markdown file written",
    }
    one = previous.get("1") or {}
    if run == "1":
        line["baseline_pages_per_s"] = pps
        line["scaling"] = 1.0 if pps else None
        line["efficiency"] = 1.0 if pps else None
    elif one.get("pages_per_s") and pps:
        line["baseline_pages_per_s"] = one["pages_per_s"]
        line["scaling"] = round(pps / one["pages_per_s"], 3)
        line["efficiency"] = round(pps / (n_gpus * one["pages_per_s"]), 3)  # issue 13: N-GPU / (N x 1-GPU)
        line["scaling_target"] = round(SCALE_TARGETS["scaling"] * n_gpus / 2, 2)
        line["scaling_met"] = line["scaling"] >= line["scaling_target"]
        if summary.get("pages_per_s") and (one.get("summary_pages_per_s")):
            line["scaling_summary"] = round(summary["pages_per_s"] / one["summary_pages_per_s"], 3)
    g = previous.get("gpus") or {}
    if run == "ray" and g.get("pages_per_s") and pps:
        ref = g.get("pages_per_s_last_ready") or g["pages_per_s"]
        line["gpus_pages_per_s"] = g["pages_per_s"]
        line["gpus_pages_per_s_last_ready"] = g.get("pages_per_s_last_ready")
        line["ray_vs_gpus"] = round(pps / ref, 3)
        line["ray_vs_gpus_first_ready"] = round(pps / g["pages_per_s"], 3)
        line["ray_vs_gpus_target"] = SCALE_TARGETS["ray_vs_gpus"]
        line["ray_vs_gpus_met"] = line["ray_vs_gpus"] >= SCALE_TARGETS["ray_vs_gpus"]
        if summary.get("pages_per_s") and g.get("summary_pages_per_s"):
            line["ray_vs_gpus_summary"] = round(summary["pages_per_s"] / g["summary_pages_per_s"], 3)
    for k in (
        "md_files",
        "returncode",
        "timed_out",
        "argv",
        "pipeline_summary",
        "worker_logs",
        "step_heartbeats",
    ):
        if k in res:
            line[f"product_{k}"] = res[k]
    return line


def run_scale(a: argparse.Namespace, env: dict[str, str]) -> int:
    """``--scale``: the named runs in order on the same generated PDFs, one JSON line each."""
    runs = [r.strip() for r in a.scale.split(",") if r.strip()]
    bad = [r for r in runs if r not in SCALE_RUNS]
    if bad or not runs:
        print(
            f"error: --scale takes a comma list of {', '.join(SCALE_RUNS)}; got {a.scale!r}", file=sys.stderr
        )
        return 2
    ids = _gpu_list(a.gpus)
    n = len(ids)
    ppg = a.pages_per_gpu or a.pages
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    key = {
        "model_dir": a.model_dir,
        "gpus": ids,
        "pages_per_gpu": ppg,
        "max_tokens": a.max_tokens,
        "max_num_seqs": a.max_num_seqs,
        "kv_cache_dtype": a.kv_cache_dtype,
        "dpi": a.dpi,
        "gpu_memory_utilization": a.gpu_memory_utilization,
        "render_workers": a.render_workers,
        "cli_extra": a.cli_extra,
    }
    state_path = work / "scale_results.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("key") != key:  # another workload: earlier results are not comparable
        state = {"key": key, "runs": {}}
    common = _common_fields(a)
    t_start = time.time()
    for run in runs:
        left = a.deadline_s - (time.time() - t_start) if a.deadline_s else None
        if left is not None and left < a.min_run_s:
            print(f"SKIP scale run {run}: {left:.0f} s left of --deadline-s {a.deadline_s:g}", flush=True)
            continue
        limits = [x for x in (a.product_timeout, left) if x]
        pages = ppg if run == "1" else ppg * n
        pdf_dir = scale_pdfs(work, pages, a.pdf_workers)
        kw = scale_run_kwargs(a, run, ids, env)
        run_env = kw.pop("env")
        print(f"=== scale run {run}: {pages} pages, {len(ids) if run != '1' else 1} GPU(s)", flush=True)
        res, mon = run_product_cli(
            a,
            work / f"scale_{run}",
            run_env,
            pdf_dir=str(pdf_dir),
            pages=pages,
            timeout=min(limits) if limits else None,
            **kw,
        )
        docs = len(list(pdf_dir.glob("*.pdf")))
        line = {
            **common,
            "pages_per_gpu": ppg,
            "gpu_ids": ids if run != "1" else ids[:1],
            **scale_line(run, res, state["runs"], n_gpus=n, pages=pages, docs=docs),
        }
        line["render_workers"] = kw.get("render_workers")
        if "t1" in res and "t0" in res:
            line["product_monitor"] = mon.summary(res["t0"], res["t1"])
        line["host"] = f"{platform.machine()} {os.cpu_count()} cores"
        text = json.dumps(line)
        print(text, flush=True)
        _append_jsonl(a.jsonl, text)
        state["runs"][run] = line
        state_path.write_text(json.dumps(state, indent=1))
    brief = {
        r: {k: v.get(k) for k in ("pages", "pages_per_s", "engine_startup_s", "scaling", "ray_vs_gpus")}
        for r, v in state["runs"].items()
    }
    print("SCALE " + json.dumps(brief), flush=True)
    return 0


def _common_fields(a: argparse.Namespace) -> dict[str, Any]:
    cfg = json.loads((Path(a.model_dir) / "config.json").read_text())
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": _device_name(),
        "vllm": _version("vllm"),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "model": cfg.get("_name_or_path") or Path(a.model_dir).name,
        "workload": f"A4 {a.dpi:g}dpi gundam, {a.max_tokens} forced out tokens, guard 30/90, "
        f"kv {a.kv_cache_dtype}, dummy weights, max_num_seqs {a.max_num_seqs}",
        "product_mode": "cli",
        "tag": a.tag,
    }


def _append_jsonl(path: str, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="dummy model folder (tools/make_dummy_model.py)")
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--dpi", type=float, default=144.0)
    ap.add_argument("--max-tokens", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM's share (baseline and engine mode: default 0.9; the CLI product: its own default)",
    )
    ap.add_argument("--render-workers", type=int, default=max(2, (os.cpu_count() or 4) - 4))
    ap.add_argument(
        "--batch-pages", type=int, help="the product's in-flight window (default: the product's own)"
    )
    ap.add_argument("--product", choices=("cli", "engine", "none"), default="cli")
    ap.add_argument("--baseline", choices=("on", "off"), default="on")
    ap.add_argument("--guard-ab", action="store_true", help="engine mode: rerun the pages with the guard off")
    ap.add_argument(
        "--round-caps",
        default="",
        help="engine mode: extra warm rounds (guard on) with in-flight capped at each value, e.g. 512",
    )
    ap.add_argument(
        "--guard-plan",
        default="",
        help="engine mode: warm rounds after the cold one, guard per round (off, device, host), "
        "e.g. off,device,off,device,host; the summary gives each one's mean and cost vs off",
    )
    ap.add_argument(
        "--baseline-pages",
        type=int,
        default=None,
        help="baseline on the first N pages of the set (same documents; default: all pages)",
    )
    ap.add_argument("--mp-method", default="fork", help="engine mode: how vLLM starts its engine core")
    ap.add_argument("--stall-s", type=float, default=90.0, help="engine mode: give up a round after N s idle")
    ap.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="baseline: skip the warm-up batch the product's engine runs at start-up",
    )
    ap.add_argument("--baseline-timeout", type=float, default=None, help="kill the baseline after N s")
    ap.add_argument("--work-dir", default="/tmp/ocr_bench")
    ap.add_argument("--jsonl", default=str(ROOT / "tmp_pdf_runs" / "benchmarks.jsonl"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--gpu-mem-cap-gib", type=float, default=None, help="recorded with the result")
    ap.add_argument(
        "--gpus",
        default=None,
        help="cli mode: GPU ids for the product's local launcher (--gpus), or with --executor ray the "
        "GPUs given to Ray (one engine actor each); --scale: the GPUs of the N-GPU runs (default 0,1)",
    )
    ap.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="cli mode: the product's executor"
    )
    ap.add_argument(
        "--scale",
        default=None,
        help="comma list of runs on the same PDFs, in order: 1 (first GPU, plain CLI), gpus (local "
        "launcher over --gpus), ray (--executor ray over --gpus); one JSON line each",
    )
    ap.add_argument(
        "--pages-per-gpu", type=int, default=None, help="--scale: pages per GPU (default --pages)"
    )
    ap.add_argument(
        "--product-timeout", type=float, default=None, help="cli mode: stop a product run after N s"
    )
    ap.add_argument(
        "--deadline-s", type=float, default=None, help="--scale: skip runs that would start later"
    )
    ap.add_argument("--min-run-s", type=float, default=150.0, help="--scale: least time a run needs")
    ap.add_argument("--pdf-workers", type=int, default=os.cpu_count() or 1, help="processes making the PDFs")
    ap.add_argument("--cli-extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags (last)")
    ap.add_argument("--child", choices=("baseline", "engine"), help=argparse.SUPPRESS)
    ap.add_argument("--pdf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "baseline":
        child_baseline(a)
        return 0
    if a.child == "engine":
        child_engine(a)
        return 0

    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1"
    )
    if a.scale:
        return run_scale(a, env)
    multi_run = "ray" if a.executor == "ray" else "gpus" if a.gpus else None
    if multi_run and a.product != "cli":
        print("error: --gpus / --executor ray need --product cli", file=sys.stderr)
        return 2
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pdf_dir = work / "pdfs"
    if pdf_dir.exists():
        for p in pdf_dir.glob("*.pdf"):
            p.unlink()
    make_pdfs(pdf_dir, a.pages, workers=a.pdf_workers)
    a.pdf_dir = str(pdf_dir)
    common = [
        *([] if a.warmup else ["--no-warmup"]),
        "--model-dir",
        a.model_dir,
        "--pdf-dir",
        a.pdf_dir,
        "--dpi",
        str(a.dpi),
        "--max-tokens",
        str(a.max_tokens),
        "--max-num-seqs",
        str(a.max_num_seqs),
        "--kv-cache-dtype",
        a.kv_cache_dtype,
        "--gpu-memory-utilization",
        str(a.gpu_memory_utilization or BASELINE_UTIL),
        "--render-workers",
        str(a.render_workers),
        "--stall-s",
        str(a.stall_s),
    ]
    prod: dict[str, Any] = {}
    mon_p: Monitor | None = None
    if a.product == "cli" and multi_run:
        kw = scale_run_kwargs(a, multi_run, _gpu_list(a.gpus), env)
        prod, mon_p = run_product_cli(a, work, kw.pop("env"), timeout=a.product_timeout, **kw)
    elif a.product == "cli":
        prod, mon_p = run_product_cli(a, work, env, timeout=a.product_timeout)
    elif a.product == "engine":
        with Monitor() as mon_p:
            prod, _ = _run_child(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "engine",
                    *common,
                    "--out-dir",
                    str(work / "engine"),
                    *(["--guard-ab"] if a.guard_ab else []),
                    *(["--guard-plan", a.guard_plan] if a.guard_plan else []),
                    *(["--round-caps", a.round_caps] if a.round_caps else []),
                ],
                work / "engine.log",
                {**env, "VLLM_WORKER_MULTIPROC_METHOD": a.mp_method},
            )
    print("PRODUCT " + json.dumps(prod), flush=True)
    base: dict[str, Any] = {}
    mon_b: Monitor | None = None
    if a.baseline == "on":
        base_common = list(common)
        if a.baseline_pages and a.baseline_pages < a.pages:
            # the same first documents (make_pdfs is deterministic), fewer of them: the seeds'
            # approach runs at a rate that does not depend on the page count (all pages at once)
            base_dir = work / "pdfs_baseline"
            if base_dir.exists():
                for p in base_dir.glob("*.pdf"):
                    p.unlink()
            make_pdfs(base_dir, a.baseline_pages, workers=a.pdf_workers)
            base_common[base_common.index("--pdf-dir") + 1] = str(base_dir)
        with Monitor() as mon_b:
            base, _ = _run_child(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "baseline",
                    *base_common,
                    "--out-dir",
                    str(work / "baseline"),
                ],
                work / "baseline.log",
                # The seeds' approach is stock vLLM: our vLLM plugin (entry point, loaded by vLLM in
                # every process) must not speed it up.
                {**env, "RUNNER_VLLM_PLUGIN": "0"},
                timeout=a.baseline_timeout,
            )

    def pps(r: dict[str, Any]) -> float | None:
        return round(r["pages"] / (r["t1"] - r["t0"]), 3) if "t1" in r and r["t1"] > r["t0"] else None

    cfg = json.loads((Path(a.model_dir) / "config.json").read_text())
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": _device_name(),
        "vllm": _version("vllm"),
        "torch": _version("torch"),
        "model": cfg.get("_name_or_path") or Path(a.model_dir).name,
        "workload": f"A4 {a.dpi:g}dpi gundam, {a.max_tokens} forced out tokens, guard 30/90, "
        f"kv {a.kv_cache_dtype}, dummy weights, max_num_seqs {a.max_num_seqs}",
        "pages": a.pages,
        "baseline_pages": base.get("pages") if base else None,
        "product_mode": a.product,
        "pages_per_s": pps(prod) if prod else None,
        "baseline_pages_per_s": pps(base) if base else None,
        "engine_startup_s": prod.get("startup_s"),
        "baseline_startup_s": base.get("startup_s"),
        "render_workers": a.render_workers,
        "tag": a.tag,
    }
    if result["pages_per_s"] and result["baseline_pages_per_s"]:
        result["ratio"] = round(result["pages_per_s"] / result["baseline_pages_per_s"], 2)
    if prod.get("noguard_pages_per_s"):
        result["noguard_pages_per_s"] = prod["noguard_pages_per_s"]
        result["warm_guard_pages_per_s"] = prod["warm_guard_pages_per_s"]
        result["round_pages_per_s"] = prod["round_pages_per_s"]
        result["round_guard"] = prod.get("round_guard")
        result["guard_overhead"] = round(1 - prod["warm_guard_pages_per_s"] / prod["noguard_pages_per_s"], 3)
        for k in ("warm_mean_pages_per_s", "guard_cost_device", "guard_cost_host"):
            if k in prod:
                result[k] = prod[k]
    if mon_p is not None and "t1" in prod:
        result["product_monitor"] = mon_p.summary(prod["t0"], prod["t1"])
    if mon_b is not None and "t1" in base:
        result["baseline_monitor"] = mon_b.summary(base["t0"], base["t1"])
    for k in (
        "mean_in_flight",
        "engine_stats",
        "output_tokens",
        "md_files",
        "returncode",
        "argv",
        "pipeline_summary",
        "step_heartbeats",
    ):
        if k in prod:
            result[f"product_{k}"] = prod[k]
    if base:
        result["baseline_returncode"] = base.get("returncode")
        result["baseline_render_s"] = base.get("render_s")
    if a.gpu_mem_cap_gib is not None:
        result["gpu_mem_cap_gib"] = a.gpu_mem_cap_gib
    if multi_run:
        result["gpus"] = len(_gpu_list(a.gpus))
        result["executor"] = a.executor
        for k in ("pages_per_s_last_ready", "startup_max_s", "ready_skew_s", "worker_logs", "timed_out"):
            if k in prod:
                result[f"product_{k}"] = prod[k]
    result["host"] = f"{platform.machine()} {os.cpu_count()} cores"
    line = json.dumps(result)
    print(line, flush=True)
    if a.jsonl:
        Path(a.jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(a.jsonl, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # not installed
        return None


def _device_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().replace("\n", "; ") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "no GPU"


if __name__ == "__main__":
    raise SystemExit(main())
