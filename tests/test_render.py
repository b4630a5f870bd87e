"""Render pool isolation: limits, timeouts, crashes and hostile PDFs never stop the parent."""

from __future__ import annotations

import json
import os
import resource
import time

import pdfgen
import pytest

from runner import render
from runner.render import OpenTask, RenderPool, RenderTask


def _collect_all(pool: RenderPool, n: int, limit_s: float = 120) -> list:
    out = []
    t0 = time.monotonic()
    while len(out) < n:
        out.extend(pool.collect(timeout=0.1))
        assert time.monotonic() - t0 < limit_s, "pool did not answer in time"
    return out


def test_render_page_and_open(tmp_path):
    p = pdfgen.text_pdf(tmp_path / "a.pdf", pages=2)
    with RenderPool(workers=1) as pool:
        pool.submit(OpenTask(1, "a", str(p)))
        pool.submit(RenderTask(2, "a", str(p), 1, dpi=144))
        res = {r.task.task_id: r for r in _collect_all(pool, 2)}
    assert res[1].kind == "ok" and res[1].payload["page_count"] == 2
    img = res[2].payload
    assert res[2].kind == "ok" and img.width in (1190, 1191) and img.height == 1684  # A4 at 144 dpi
    assert len(img.pixels) == img.width * img.height * 3
    assert "Page 2 heading" in img.text_layer and not img.blank
    assert img.render_seconds > 0


def test_too_large_page_is_refused_before_rendering(tmp_path):
    p = pdfgen.huge_page_pdf(tmp_path / "huge.pdf", inches=200)
    with RenderPool(workers=1) as pool:
        pool.submit(RenderTask(1, "h", str(p), 0, dpi=144))
        (r,) = _collect_all(pool, 1)
    assert r.kind == "too_large" and "MP" in r.message and "200x200 in" in r.message


def test_timeout_kills_and_replaces_worker(tmp_path):
    p = pdfgen.pdf_with_pages(tmp_path / "d.pdf", ["dark", "text"])
    with RenderPool(workers=1, render_timeout_s=2) as pool:
        pool.submit(RenderTask(1, "d", str(p), 0, dpi=72, hook=("slow_hook:hang_if_dark", {})))
        pool.submit(RenderTask(2, "d", str(p), 1, dpi=72, hook=("slow_hook:hang_if_dark", {})))
        res = {r.task.task_id: r for r in _collect_all(pool, 2)}
        assert pool.restarts == 1
    assert res[1].kind == "timeout" and res[2].kind == "ok"


@pytest.mark.parametrize("maker", ["cyclic_pages_pdf", "nested_content_pdf"])
def test_hostile_structures_give_results_not_crashes(tmp_path, maker):
    p = getattr(pdfgen, maker)(tmp_path / f"{maker}.pdf")
    with RenderPool(workers=1, render_timeout_s=30, open_timeout_s=30) as pool:
        pool.submit(OpenTask(1, "x", str(p)))
        (o,) = _collect_all(pool, 1)
        if o.kind == "ok" and o.payload["page_count"] > 0:
            pool.submit(RenderTask(2, "x", str(p), 0, dpi=72))
            (r,) = _collect_all(pool, 1)
            assert r.kind in ("ok", "error", "timeout", "crash")
        else:
            assert o.kind in ("ok", "error", "timeout", "crash") and (o.message or o.kind == "ok")


@pytest.mark.slow
def test_image_bomb_is_contained(tmp_path, run_fake):
    src = tmp_path / "in"
    src.mkdir()
    pdfgen.image_bomb_pdf(src / "bomb.pdf")
    pdfgen.text_pdf(src / "good.pdf", pages=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, out, _ = run_fake(src, "--render-memory-mb", "512", "--render-timeout", "60")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = json.loads((out / "_run_summary.json").read_text())
    by = {d["source"].rsplit("/", 1)[-1]: d for d in summary["docs"]}
    assert by["good.pdf"]["status"] == "ok"
    assert by["bomb.pdf"]["status"] in ("ok", "failed")
    recs = [json.loads(x) for x in (out / "bomb.pages.jsonl").read_text().splitlines()]
    assert len(recs) == 1
    # MuPDF either decodes the image at reduced size within the worker's 512 MB, or the worker
    # hits its limit: the page has a recorded outcome either way.
    assert recs[0]["status"] in ("ok", "render_error", "render_timeout"), recs[0]
    assert after - before < 500_000, "the parent process must not hold the decompressed image"  # KiB


@pytest.mark.slow
def test_thousands_of_tiny_pages(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.many_pages_pdf(src / "many.pdf", 3000)
    code, out, _ = run_fake(src, "--max-pages", "20")
    assert code == 0
    done = json.loads((out / "many.done").read_text())
    assert done["page_count"] == 3000 and done["pages"] == 20


def test_idle_worker_killed_then_task_still_gets_its_own_result(tmp_path):
    import os
    import signal

    p = pdfgen.text_pdf(tmp_path / "a.pdf", pages=1)
    with RenderPool(workers=1) as pool:
        pool.wait_ready()
        os.kill(pool._pool[0].proc.pid, signal.SIGKILL)
        pool._pool[0].proc.join(5)
        pool.submit(RenderTask(7, "a", str(p), 0, dpi=72))
        (r,) = _collect_all(pool, 1)
    assert r.task.task_id == 7 and r.kind == "ok" and "Page 1 heading" in r.payload.text_layer


def test_workers_that_cannot_start_fail_tasks_instead_of_hanging(tmp_path):
    p = pdfgen.text_pdf(tmp_path / "a.pdf", pages=1)
    with RenderPool(workers=1, mem_limit_mb=20) as pool:  # too little to import PyMuPDF
        pool.wait_ready(timeout=60)
        pool.submit(RenderTask(1, "a", str(p), 0, dpi=72))
        (r,) = _collect_all(pool, 1, limit_s=90)
    assert r.kind == "crash" and "while starting" in r.message


def _niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX priorities")
def test_render_workers_run_at_a_lower_priority_than_the_process_that_feeds_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(render.RENDER_NICE_ENV, raising=False)
    mine = _niceness(os.getpid())
    with RenderPool(workers=1) as pool:
        pool.wait_ready()
        worker = pool._pool[0].proc.pid
        assert _niceness(worker) == min(19, mine + render.DEFAULT_RENDER_NICE)
    assert _niceness(os.getpid()) == mine  # the parent keeps its own
    monkeypatch.setenv(render.RENDER_NICE_ENV, "0")  # the operator can keep them level
    with RenderPool(workers=1) as pool:
        pool.wait_ready()
        assert _niceness(pool._pool[0].proc.pid) == mine
