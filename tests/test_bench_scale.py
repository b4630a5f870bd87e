"""tools/bench.py's several-GPU mode (issues 9 and 10): start-up parsing, t0 definitions, ratios,
the CLI command lines, and the run plumbing with a stand-in CLI (no GPU, no vLLM)."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools import bench


def _args(**kw: object) -> argparse.Namespace:
    base = dict(
        model_dir="m",
        pdf_dir="/pdfs",
        pages=64,
        dpi=144.0,
        max_tokens=1000,
        max_num_seqs=512,
        kv_cache_dtype="fp8",
        gpu_memory_utilization=0.9,
        render_workers=28,
        cli_extra=[],
    )
    base.update(kw)
    return argparse.Namespace(**base)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t % 1 * 1000):03d}"


def test_engine_ready_times_reads_only_the_pipeline_start_lines(tmp_path: Path) -> None:
    t = 1_790_000_000.25
    log = tmp_path / "run.log"
    log.write_text(
        "\n".join(
            [
                f"{_stamp(t)} INFO runner: command: --gpus 0,1",
                f"{_stamp(t + 80)} INFO runner.engines.vllm_engine: vLLM engine ready in 79.0 s (x, y)",
                f"{_stamp(t + 80.5)} INFO runner: engine vllm started in 80.1 s",
                f"{_stamp(t + 78)} INFO runner: engine vllm started in 77.9 s",
                "garbage engine vllm started in 3 s",
                f"{_stamp(t + 90)} WARNING runner: engine vllm started in 1.0 s",
            ]
        )
    )
    got = bench.engine_ready_times(log)
    assert [round(x[1], 1) for x in got] == [77.9, 80.1]  # sorted by time
    assert got[0][0] == pytest.approx(t + 78, abs=0.002)
    assert got[1][0] == pytest.approx(t + 80.5, abs=0.002)
    assert bench.engine_ready_times(tmp_path / "missing.log") == []


def test_ready_window_first_and_last_ready_and_restarts_ignored() -> None:
    readies = [(100.0, 80.0), (103.0, 83.0), (150.0, 20.0)]  # the third is a restart
    w = bench.ready_window(readies, 2, 203.0, 1000)
    assert w["t0"] == 100.0 and w["t0_last_ready"] == 103.0 and w["t1"] == 203.0
    assert w["startup_s"] == 80.0 and w["startup_max_s"] == 83.0 and w["ready_skew_s"] == 3.0
    assert w["pages_per_s_last_ready"] == 10.0
    assert w["engines_ready"] == 2
    assert bench.ready_window([], 2, 203.0, 10) == {"engines_ready": 0}
    assert "t0" not in bench.ready_window(readies, 1, None, 10)


def _res(t0: float, t1: float, **kw: object) -> dict[str, object]:
    r: dict[str, object] = {"returncode": 0, "md_files": 24, "t0": t0, "t1": t1, "startup_s": 80.0}
    r.update(kw)
    return r


def test_scale_line_ratios_use_the_conservative_t0() -> None:
    prev: dict[str, dict[str, object]] = {}
    one = bench.scale_line("1", _res(0.0, 76.8), prev, n_gpus=2, pages=768, docs=24)
    assert one["gpus"] == 1 and one["executor"] == "local"
    assert one["pages_per_s"] == 10.0 and one["scaling"] == 1.0 and one["baseline_pages_per_s"] == 10.0
    prev["1"] = one
    # two workers, ready 2 s apart; the run's rate counts from the first one
    g = _res(0.0, 80.0, md_files=48, engines_ready=2, expected_engine_starts=2, t0_last_ready=2.0)
    g["pages_per_s_last_ready"] = round(1536 / 78.0, 3)
    gl = bench.scale_line("gpus", g, prev, n_gpus=2, pages=1536, docs=48)
    assert gl["gpus"] == 2 and gl["executor"] == "local"
    assert gl["pages_per_s"] == 19.2 and gl["scaling"] == 1.92 and gl["scaling_met"] is True
    assert gl["efficiency"] == 0.96 and one["efficiency"] == 1.0
    assert gl["baseline_pages_per_s"] == 10.0 and gl["scaling_target"] == 1.9
    prev["gpus"] = gl
    r = _res(0.0, 80.0, md_files=48, engines_ready=1, expected_engine_starts=1)
    rl = bench.scale_line("ray", r, prev, n_gpus=2, pages=1536, docs=48)
    assert rl["executor"] == "ray" and rl["gpus"] == 2
    # against the launcher's last-ready rate (its higher one): conservative for Ray
    assert rl["ray_vs_gpus"] == round(19.2 / (1536 / 78.0), 3) < rl["ray_vs_gpus_first_ready"] == 1.0
    assert rl["ray_vs_gpus_met"] is True and rl["scaling"] == 1.92


@pytest.mark.parametrize(
    "bad",
    [{"returncode": 1}, {"timed_out": True}, {"md_files": 23}, {"engines_ready": 1}],
)
def test_scale_line_incomplete_runs_get_no_rate(bad: dict[str, object]) -> None:
    prev = {"1": {"pages_per_s": 10.0, "summary_pages_per_s": 10.0}}
    r = _res(0.0, 80.0, md_files=24, engines_ready=2, expected_engine_starts=2)
    r.update(bad)
    line = bench.scale_line("gpus", r, prev, n_gpus=2, pages=768, docs=24)
    assert line["complete"] is False and line["pages_per_s"] is None and "scaling" not in line


def test_cli_argv_single_unchanged_and_multi_windows() -> None:
    a = _args(cli_extra=["--profile", "auto"])
    single = bench.cli_argv(a, "/pdfs", Path("/o/product"), Path("/o/run.log"))
    expected = (
        "run_pdf_ocr_vllm.py --input-dir /pdfs --output-dir /o/product --engine vllm --model m "
        "--load-format dummy --ignore-eos --max-tokens 1000 --kv-cache-dtype fp8 --retries 0 "
        "--no-large-pass --max-num-seqs 512 --dpi 144.0 --gpu-memory-utilization 0.9 --progress log "
        "--force --render-workers 28 --log-file /o/run.log --profile auto"
    )
    assert " ".join(single[1:]) == expected
    g = bench.cli_argv(a, "/p", Path("/o"), Path("/l"), gpus="0,1", engines=2, render_workers=14)
    # local workers size their own windows (profiles.inflight_window) unless one is given
    assert g[g.index("--gpus") + 1] == "0,1" and "--batch-pages" not in g
    given = bench.cli_argv(_args(batch_pages=700), "/p", Path("/o"), Path("/l"), gpus="0,1", engines=2)
    assert given[given.index("--batch-pages") + 1] == "700"
    assert g[-2:] == ["--profile", "auto"]
    r = bench.cli_argv(a, "/p", Path("/o"), Path("/l"), executor="ray", engines=2, render_workers=28)
    assert r[r.index("--executor") + 1] == "ray" and r[r.index("--ray-engine-actors") + 1] == "2"
    # no share given: the product picks its own (for --engines-per-gpu, each engine's measured share)
    own = bench.cli_argv(_args(gpu_memory_utilization=None), "/p", Path("/o"), Path("/l"))
    assert "--gpu-memory-utilization" not in own
    assert r[r.index("--ray-render-tasks") + 1] == "28"
    # Ray's one window holds what the two workers' windows hold together: a batch running and
    # one queued each
    assert int(r[r.index("--batch-pages") + 1]) == 2 * (2 * 512)
    assert "--gpus" not in r


def test_scale_run_kwargs_split_the_host() -> None:
    a = _args(render_workers=28)
    env = {"X": "1"}
    one = bench.scale_run_kwargs(a, "1", ["0", "1"], env)
    assert one["env"]["CUDA_VISIBLE_DEVICES"] == "0" and one["devices"] == [0] and one["render_workers"] == 28
    g = bench.scale_run_kwargs(a, "gpus", ["0", "1"], env)
    assert g["gpus"] == "0,1" and g["render_workers"] == 14 and "CUDA_VISIBLE_DEVICES" not in g["env"]
    r = bench.scale_run_kwargs(a, "ray", ["0", "1"], env)
    assert r["executor"] == "ray" and r["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and r["engines"] == 2
    with pytest.raises(ValueError):
        bench.scale_run_kwargs(a, "tp", ["0"], env)


_FAKE_CLI = textwrap.dedent(
    """
    # Stands in for run_pdf_ocr_vllm.py --gpus: two workers share --log-file, each logs its
    # engine start (1.5 s apart), the parent names the worker logs, then the Markdown appears.
    import json, logging, os, sys, time
    argv = sys.argv[1:]
    opt = lambda n: argv[argv.index(n) + 1]
    out, log_file = opt("--output-dir"), opt("--log-file")
    os.makedirs(out, exist_ok=True)
    h = logging.FileHandler(log_file)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("runner"); log.addHandler(h); log.setLevel(logging.INFO)
    for k in range(2):
        p = os.path.join(out, f"w{k}.log"); open(p, "w").write("worker log\\n")
        print(f"worker shard-{k}-of-2 on GPU {k}: log {p}", file=sys.stderr, flush=True)
    log.info("engine vllm started in 80.0 s")
    time.sleep(1.5)
    log.info("engine vllm started in 81.5 s")
    time.sleep(0.5)
    for i in range(4):
        open(os.path.join(out, f"bench_{i:03d}.md"), "w").write("x")
    json.dump({"pages_per_s": 1.0, "pages_total": 128, "per_shard": {}, "executor": "local"},
              open(os.path.join(out, "_run_summary.json"), "w"))
    """
)


def test_run_product_cli_multi_reads_t0_from_the_shared_log(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "fake_cli.py"
    fake.write_text(_FAKE_CLI)
    orig = bench.cli_argv
    monkeypatch.setattr(bench, "cli_argv", lambda *a, **k: [sys.executable, str(fake), *orig(*a, **k)[2:]])
    out = tmp_path / "run"
    out.mkdir()
    (out / "product_run.log").write_text(
        "2020-01-01 00:00:00,000 INFO runner: engine vllm started in 9.0 s\n"
    )
    t_before = time.time()
    res, _mon = bench.run_product_cli(
        _args(), out, {"PATH": "/usr/bin:/bin"}, pdf_dir="/x", pages=128, gpus="0,1", engines=2, timeout=60
    )
    assert res["returncode"] == 0 and res["md_files"] == 4
    assert res["engines_ready"] == 2 and res["startup_s"] == 80.0 and res["startup_max_s"] == 81.5
    assert t_before - 0.01 <= res["t0"] < res["t0_last_ready"] < res["t1"]  # the stale line was dropped
    assert res["ready_skew_s"] == pytest.approx(1.5, abs=0.3)
    assert res["pipeline_summary"]["executor"] == "local" and "per_shard" in res["pipeline_summary"]
    assert [Path(p).name for p in res["worker_logs"]] == ["shard-0-of-2.log", "shard-1-of-2.log"]
    line = bench.scale_line("gpus", res, {}, n_gpus=2, pages=128, docs=4)
    assert line["complete"] is True
    assert line["pages_per_s"] == round(128 / (res["t1"] - res["t0"]), 3) < line["pages_per_s_last_ready"]


def test_run_child_timeout_sends_sigterm_first(tmp_path: Path) -> None:
    marker = tmp_path / "got_term"
    script = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), sys.exit(3)))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    t = time.time()
    res, _ = bench._run_child(
        [sys.executable, "-c", script], tmp_path / "log", {}, timeout=1.0, term_grace=10
    )
    assert time.time() - t < 20
    assert res["timed_out"] is True and res["returncode"] == 3 and marker.exists()


def test_make_pdfs_parallel_matches_serial(tmp_path: Path) -> None:
    import pymupdf

    a = bench.make_pdfs(tmp_path / "a", 5, per_pdf=2)
    b = bench.make_pdfs(tmp_path / "b", 5, per_pdf=2, workers=2)
    assert [p.name for p in a] == [p.name for p in b] == ["bench_000.pdf", "bench_001.pdf", "bench_002.pdf"]
    for x, y in zip(a, b, strict=True):
        with pymupdf.open(str(x)) as dx, pymupdf.open(str(y)) as dy:
            assert [pg.get_text() for pg in dx] == [pg.get_text() for pg in dy]
    # a larger set starts with the same documents (the one-GPU set is a prefix of the N-GPU set)
    c = bench.make_pdfs(tmp_path / "c", 3, per_pdf=2)
    with pymupdf.open(str(c[0])) as dc, pymupdf.open(str(a[0])) as da:
        assert [pg.get_text() for pg in dc] == [pg.get_text() for pg in da]


def test_guard_summary_means_per_setting_and_costs_against_off() -> None:
    # session 3's batch-256 rounds: off, device, off, device, host
    got = bench.guard_summary(
        ["off", "device", "off", "device", "host"], [16.119, 14.615, 16.95, 18.928, 15.165]
    )
    assert got["warm_mean_pages_per_s"] == {"off": 16.535, "device": 16.771, "host": 15.165}
    assert got["noguard_pages_per_s"] == 16.535 and got["warm_guard_pages_per_s"] == 16.771
    assert got["warm_host_guard_pages_per_s"] == 15.165
    assert got["guard_cost_device"] == -0.014 and got["guard_cost_host"] == 0.083
    # --guard-ab is the plan off,device,host: one round each, the costs of those rounds
    ab = bench.guard_summary(["off", "device", "host"], [18.81, 17.38, 19.41])
    assert ab["guard_cost_device"] == round(1 - 17.38 / 18.81, 3) and ab["guard_cost_host"] == -0.032
    assert "noguard_pages_per_s" not in bench.guard_summary(["device"], [10.0])  # no baseline round


def test_step_heartbeats_ms_per_step_and_stalls(tmp_path: Path) -> None:
    t = 1_790_000_000.0
    beat = "INFO runner.engines.x: vllm engine: pending={p} inbox=0 vllm_unfinished={p} steps={s} added=0"
    log = tmp_path / "shard-0-of-2.log"
    log.write_text(
        "\n".join(
            [
                f"{_stamp(t)} INFO runner: command: x",
                f"{_stamp(t + 1)} " + beat.format(p=512, s=10),  # prefill: 20 steps in 10 s
                f"{_stamp(t + 11)} " + beat.format(p=512, s=30),
                f"{_stamp(t + 21)} " + beat.format(p=512, s=530),  # decode: 500 steps in 10 s
                f"{_stamp(t + 31)} " + beat.format(p=256, s=530),  # a stall: no step
                f"{_stamp(t + 32)} WARNING x: vllm engine: pending=1 inbox=0 steps=999",  # not a beat
            ]
        )
    )
    hb = bench.step_heartbeats(log)
    assert hb is not None
    assert hb["beats"] == 4 and hb["steps"] == 530
    assert hb["ms_per_step_min"] == 20.0 and hb["ms_per_step_max"] == 500.0
    assert hb["ms_per_step_median"] == 500.0  # of [500, 20]: the upper middle
    assert hb["beats_without_steps"] == 1
    assert hb["series"] == [[10.0, 500.0, 512], [20.0, 20.0, 512], [30.0, None, 256]]
    one = tmp_path / "one.log"
    one.write_text(f"{_stamp(t)} " + beat.format(p=5, s=1))
    assert bench.step_heartbeats(one) is None
    assert bench.step_heartbeats(tmp_path / "missing.log") is None
