"""What a page costs the Ray driver and the engine actors, against the local executor's main
process (tooling, CPU; no GPU, no model).

The same pages, the test suite's FakeEngine (instant answers) and the vLLM engine's preprocessing
hook in the render workers (so each page carries its ~6 MB of pixels and ~21 MB of preprocessed
views, as on a GPU run): once through the local executor (``Pipeline`` with its render pool), once
through ``--executor ray`` on a local Ray cluster (render tasks, two engine actors). Prints, per
run, the CPU seconds per page of the driver (Ray) / main process (local) and of the engine actors.
On the GPU the driver feeds both GPUs alone, so its CPU per page bounds the Ray run's pages/s
(GPU session 12: Ray 0.79-0.84 of ``--gpus``, pages reaching the engines ~10 s later).

    python tools/bench_ray_ingest.py --pages 64 --render-tasks 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
HOOK = (
    "runner.vllm_plugin.preprocess:worker_hook",
    {"base_size": 1024, "image_size": 640, "crop_mode": True, "strategy": "v1"},
)


def _config(src: Path, out: Path, render: int, window: int) -> object:
    from runner.config import RunConfig
    from runner.storage import LocalStorage

    rels = LocalStorage(src).list_files()
    return RunConfig(
        inputs=tuple(rels),
        input_root=str(src),
        output_dir=str(out),
        engine="vllm",
        render_workers=render,
        batch_pages=window,
        progress="none",
        retry_large=False,
        retry_temperatures=(),
    )


def _proc_cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_local(src: Path, out: Path, a: argparse.Namespace) -> dict[str, float]:
    from fakes import FakeFactory

    from runner.naming import docs_from_rels
    from runner.pipeline import Pipeline
    from runner.progress import Progress
    from runner.storage import LocalStorage

    cfg = _config(src, out, a.render_tasks, a.window)
    docs = docs_from_rels(list(cfg.inputs))
    pipe = Pipeline(
        cfg, FakeFactory(worker_hook=HOOK), LocalStorage(src), LocalStorage(out), Progress(len(docs), "none")
    )
    c0 = time.process_time()
    pipe.run(docs)
    return {"wall_s": time.perf_counter() - pipe.stats.t0, "main_cpu_s": time.process_time() - c0}


def run_ray(src: Path, out: Path, a: argparse.Namespace) -> dict[str, float]:
    import ray
    from fakes import FakeFactory

    from runner.executors.ray_executor import RayOptions, make_pipeline
    from runner.naming import docs_from_rels
    from runner.progress import Progress
    from runner.storage import LocalStorage

    opts = RayOptions(render_tasks=a.render_tasks, engine_actors=a.engine_actors)
    # Connected here rather than by init_ray: the cluster needs logical CPUs for the render tasks
    # and the actors (num_cpus=1 each) whatever this box has, and tests/ on the workers' path.
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "TOKENIZERS_PARALLELISM": "false"}
    ray.init(
        num_cpus=a.render_tasks + a.engine_actors,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    try:
        cfg = _config(src, out, a.render_tasks, a.window)
        docs = docs_from_rels(list(cfg.inputs))
        pipe, efactory, _pools = make_pipeline(
            cfg,
            LocalStorage(src),
            LocalStorage(out),
            Progress(len(docs), "none"),
            opts,
            FakeFactory(worker_hook=HOOK),
        )
        engine = efactory(cfg)
        base: dict[int, float] = {}

        def baseline() -> None:  # the actors' CPU once they are up (their imports and start-up)
            while not base:
                slots = getattr(engine, "_slots", [])
                if slots and all(s.pid for s in slots):
                    base.update({s.pid: _proc_cpu([s.pid]) for s in slots})
                time.sleep(0.01)

        threading.Thread(target=baseline, daemon=True).start()
        c0 = time.process_time()
        pipe.run(docs, engine=engine)
        t1 = time.perf_counter()
        res = {"wall_s": t1 - pipe.stats.t0, "main_cpu_s": time.process_time() - c0}
        res["actors_cpu_s"] = sum(_proc_cpu([pid]) - c for pid, c in base.items())
        return res
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--render-tasks", type=int, default=2)
    ap.add_argument("--engine-actors", type=int, default=2)
    ap.add_argument("--window", type=int, default=64, help="--batch-pages of both runs")
    ap.add_argument("--runs", default="local,ray")
    a = ap.parse_args(argv)
    sys.path[:0] = [str(TESTS), str(REPO)]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pdfgen

    with tempfile.TemporaryDirectory(prefix="bench_ray_ingest_") as tmp:
        src = Path(tmp) / "in"
        for d in range(a.docs):
            pdfgen.text_pdf(src / f"d{d:02d}.pdf", pages=a.pages // a.docs, prefix=f"Doc{d}")
        pages = (a.pages // a.docs) * a.docs
        for run in a.runs.split(","):
            fn = run_local if run == "local" else run_ray
            res = fn(src, Path(tmp) / f"out_{run}", a)
            line = {"run": run, "pages": pages, **{k: round(v, 3) for k, v in res.items()}}
            line["main_cpu_ms_per_page"] = round(1000 * res["main_cpu_s"] / pages, 2)
            # time inside the render task (open/render/hook), from the page records
            recs = [
                json.loads(x)
                for f in (Path(tmp) / f"out_{run}").glob("*.pages.jsonl")
                for x in f.read_text().splitlines()
            ]
            rs = [r["render_seconds"] for r in recs if r.get("render_seconds") is not None]
            line["render_ms_per_page_in_task"] = round(1000 * sum(rs) / len(rs), 1) if rs else None
            if "actors_cpu_s" in res:
                line["actors_cpu_ms_per_page"] = round(1000 * res["actors_cpu_s"] / pages, 2)
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
