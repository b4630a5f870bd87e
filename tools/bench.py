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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
A4_PT = (595.0, 842.0)
RESULT_TAG = "BENCH_RESULT "
READY_RE = re.compile(r"vLLM engine ready in ([0-9.]+) s")

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
def make_pdfs(folder: Path, pages: int, per_pdf: int = 32) -> list[Path]:
    """Text-dense A4 PDFs (a title, two paragraphs blocks and a small table per page)."""
    import pymupdf

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    done = 0
    k = 0
    while done < pages:
        n = min(per_pdf, pages - done)
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
        p = folder / f"bench_{k:03d}.pdf"
        doc.save(str(p))
        doc.close()
        paths.append(p)
        done += n
        k += 1
    return paths


# -- monitoring ----------------------------------------------------------------------------------
class Monitor:
    """Samples GPU utilisation/memory (NVML) and host CPU (psutil) in a thread."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.samples: list[tuple[float, float | None, float | None, float]] = []
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

        nv = None
        try:
            import pynvml

            pynvml.nvmlInit()
            nv = pynvml.nvmlDeviceGetHandleByIndex(
                int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
            )
        except Exception:  # NVML missing (CPU box): record CPU only
            nv = None
        psutil.cpu_percent(None)
        while not self._stop.wait(self.period):
            util = mem = None
            if nv is not None:
                import pynvml

                util = float(pynvml.nvmlDeviceGetUtilizationRates(nv).gpu)
                mem = pynvml.nvmlDeviceGetMemoryInfo(nv).used / 2**30
            self.samples.append((time.time(), util, mem, psutil.cpu_percent(None)))

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        utils = [x[1] for x in s if x[1] is not None]
        mems = [x[2] for x in self.samples if x[2] is not None]
        cpus = [x[3] for x in s]
        ncpu = os.cpu_count() or 1
        return {
            "gpu_busy_fraction": round(sum(utils) / len(utils) / 100, 3) if utils else None,
            "gpu_mem_peak_gib": round(max(mems), 2) if mems else None,
            "host_cpu_percent": round(sum(cpus) / len(cpus), 1) if cpus else None,
            "host_cores_busy": round(sum(cpus) / len(cpus) * ncpu / 100, 1) if cpus else None,
            "host_cores": ncpu,
        }


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
        gpu_memory_utilization=a.gpu_memory_utilization,
        seed=0,
        trust_remote_code=False,
        disable_log_stats=True,
    )
    tok = llm.get_tokenizer()
    wl = [tok.convert_tokens_to_ids(t) for t in ("<td>", "</td>")]
    guard_args = {"ngram_size": 30, "window_size": 90, "whitelist_token_ids": wl}
    if a.warmup:  # the same warm-up as the product's engine start-up, so the ratio is fair
        white = Image.new("RGB", (1190, 1684), "white")
        llm.generate(
            [
                {
                    "prompt": PROMPT,
                    "multi_modal_data": {"image": white},
                    "multi_modal_uuids": {"image": [f"warmup-{i}"]},
                }
                for i in range(min(a.max_num_seqs, 512))
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
        gpu_memory_utilization=a.gpu_memory_utilization,
    )
    cfg = RunConfig(
        inputs=tuple(pdfs), input_root=a.pdf_dir, output_dir=a.out_dir, engine="vllm", engine_config=ec
    )
    eng = VllmEngine(cfg)
    eng.start()
    results: list[dict[str, Any]] = []
    guard_args = dict(eng._guard_args)
    # Round 0 is the measured product run (cold, as a CLI run would be). With --guard-ab the same
    # engine then runs the pages again with the guard off and on (both warm): the guard's cost.
    plan = [True, False, True] if a.guard_ab else [True]
    with RenderPool(workers=a.render_workers) as pool:
        for rnd, guard in enumerate(plan):
            eng._guard_args = guard_args if guard else {}
            results.append(_engine_round(a, eng, pool, pdfs, rnd, OpenTask, RenderTask, PageRequest))
            print(
                f"ROUND {rnd} guard={guard} pages/s="
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
        r["noguard_pages_per_s"] = r["round_pages_per_s"][1]
        r["warm_guard_pages_per_s"] = r["round_pages_per_s"][2]
    _emit(r)


def _engine_round(
    a: argparse.Namespace,
    eng: Any,
    pool: Any,
    pdfs: list[str],
    rnd: int,
    OpenTask: Any,
    RenderTask: Any,
    PageRequest: Any,
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
            img = res.payload
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
    argv: list[str], log_path: Path, env: dict[str, str], timeout: float | None = None
) -> tuple[dict[str, Any], list[tuple[float, str]]]:
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
            import signal

            timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
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
    return res, lines


def run_product_cli(a: argparse.Namespace, out: Path, env: dict[str, str]) -> tuple[dict[str, Any], Monitor]:
    prod_out = out / "product"
    argv = [
        sys.executable,
        "run_pdf_ocr_vllm.py",
        "--input-dir",
        a.pdf_dir,
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
        "--gpu-memory-utilization",
        str(a.gpu_memory_utilization),
        "--progress",
        "log",
        "--force",
        "--render-workers",
        str(a.render_workers),
        "--batch-pages",
        str(a.max_num_seqs + 4 * a.render_workers),
        "--log-file",
        str(out / "product_run.log"),
        *a.cli_extra,
    ]
    with Monitor() as mon:
        res, lines = _run_child(argv, out / "product.log", env)
    ready = [(t, m) for t, line in lines if (m := READY_RE.search(line))]
    mds = list(prod_out.rglob("*.md"))
    res["pages"] = a.pages
    if ready and mds:
        res["t0"] = ready[0][0]
        res["startup_s"] = float(ready[0][1].group(1))
        res["t1"] = max(p.stat().st_mtime for p in mds)
    res["md_files"] = len(mds)
    res["argv"] = " ".join(argv[1:])
    summary = prod_out / "_run_summary.json"
    if summary.is_file():
        sm = json.loads(summary.read_text())
        res["pipeline_summary"] = {
            k: sm.get(k)
            for k in (
                "wall_seconds",
                "engine_startup_s",
                "pages_per_s",
                "pages",
                "pages_total",
                "loop_rate",
                "engine_restarts",
            )
        }
    return res, mon


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="dummy model folder (tools/make_dummy_model.py)")
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--dpi", type=float, default=144.0)
    ap.add_argument("--max-tokens", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--render-workers", type=int, default=max(2, (os.cpu_count() or 4) - 4))
    ap.add_argument("--product", choices=("cli", "engine", "none"), default="cli")
    ap.add_argument("--baseline", choices=("on", "off"), default="on")
    ap.add_argument("--guard-ab", action="store_true", help="engine mode: rerun the pages with the guard off")
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

    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pdf_dir = work / "pdfs"
    if pdf_dir.exists():
        for p in pdf_dir.glob("*.pdf"):
            p.unlink()
    make_pdfs(pdf_dir, a.pages)
    a.pdf_dir = str(pdf_dir)
    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1"
    )
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
        str(a.gpu_memory_utilization),
        "--render-workers",
        str(a.render_workers),
        "--stall-s",
        str(a.stall_s),
    ]
    prod: dict[str, Any] = {}
    mon_p: Monitor | None = None
    if a.product == "cli":
        prod, mon_p = run_product_cli(a, work, env)
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
                ],
                work / "engine.log",
                {**env, "VLLM_WORKER_MULTIPROC_METHOD": a.mp_method},
            )
    print("PRODUCT " + json.dumps(prod), flush=True)
    base: dict[str, Any] = {}
    mon_b: Monitor | None = None
    if a.baseline == "on":
        with Monitor() as mon_b:
            base, _ = _run_child(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "baseline",
                    *common,
                    "--out-dir",
                    str(work / "baseline"),
                ],
                work / "baseline.log",
                env,
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
        result["guard_overhead"] = round(1 - prod["warm_guard_pages_per_s"] / prod["noguard_pages_per_s"], 3)
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
    ):
        if k in prod:
            result[f"product_{k}"] = prod[k]
    if base:
        result["baseline_returncode"] = base.get("returncode")
        result["baseline_render_s"] = base.get("render_s")
    if a.gpu_mem_cap_gib is not None:
        result["gpu_mem_cap_gib"] = a.gpu_mem_cap_gib
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
