"""Launch stage (multi-GPU on one machine): GPU detection, shard composition, and the parent's
run/merge/exit-code logic with a stub worker command (the real CLI runs in test_scaleout_e2e.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.launcher import detect_gpus, merge_summaries, parse_gpus, plan_workers, run_multi_gpu

STUB = r"""
import json, os, sys
args = sys.argv[1:]
def opt(name):
    return args[args.index(name) + 1]
out, n, i = opt("--output-dir"), int(opt("--num-shards")), int(opt("--shard-index"))
os.makedirs(out, exist_ok=True)
if os.environ.get("STUB_FAIL_SHARD") == str(i):
    print("worker exploding on purpose", flush=True)
    sys.exit(3)
summary = {"shard": f"{i}-of-{n}", "files": {"ok": i + 1, "failed": 0, "skipped": 0},
           "pages": {"ok": 10 * (i + 1)}, "pages_total": 10 * (i + 1), "pages_per_s": 99.0,
           "wall_seconds": 1.0, "engine": "text", "docs": [{"source": f"d{i}.pdf", "status": "ok"}],
           "seen": {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": args,
                    "mps_pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")}}
with open(os.path.join(out, f"_run_summary.shard-{i}-of-{n}.json"), "w") as f:
    json.dump(summary, f)
print(f"stub shard {i} done", flush=True)
"""


@pytest.fixture()
def stub(tmp_path: Path) -> list[str]:
    path = tmp_path / "stub_worker.py"
    path.write_text(STUB)
    return [sys.executable, str(path)]


def test_parse_gpus_lists_and_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_gpus("0, 1,3") == ["0", "1", "3"]
    assert parse_gpus(["2"]) == ["2"]
    with pytest.raises(ValueError):
        parse_gpus("0,0")
    with pytest.raises(ValueError):
        parse_gpus(" , ")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert parse_gpus("all") == ["4", "6"]
    assert parse_gpus("1") == ["6"]  # positions within the parent's visible set
    with pytest.raises(ValueError):
        parse_gpus("2")


def test_detect_gpus_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpus() == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert detect_gpus() == []
    with pytest.raises(ValueError, match="no GPU"):
        parse_gpus("all")


def test_plan_composes_fleet_and_local_shards() -> None:
    argv = [
        "--input-dir",
        "s3://b/in",
        "--output-dir=s3://b/out",
        "--gpus",
        "all",
        "--num-shards",
        "3",
        "--shard-index=1",
        "--engine",
        "vllm",
    ]
    specs = plan_workers(argv, ["0", "1"], worker_cmd=("py", "-m", "runner"))
    assert [(s.shard_index, s.num_shards) for s in specs] == [(2, 6), (3, 6)]
    assert [dict(s.env)["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1"]
    # each worker sizes its in-flight window for its share of this host's memory
    assert [dict(s.env)["RUNNER_WORKERS_ON_HOST"] for s in specs] == ["2", "2"]
    cmd = list(specs[1].argv)
    assert cmd[:3] == ["py", "-m", "runner"]
    assert "--gpus" not in cmd and "all" not in cmd and "--shard-index=1" not in cmd
    assert cmd[-4:] == ["--num-shards", "6", "--shard-index", "3"]
    assert cmd.count("--num-shards") == 1 and "--output-dir=s3://b/out" in cmd
    assert cmd[cmd.index("--progress") + 1] == "log"
    with pytest.raises(ValueError):
        plan_workers(["--num-shards", "2", "--shard-index", "2"], ["0"])


def test_pdf_password_goes_to_the_environment_not_the_command_line() -> None:
    for argv in (["--output-dir", "o", "--password", "hunter2"], ["--output-dir", "o", "--password=hunter2"]):
        [spec] = plan_workers(argv, ["0"], worker_cmd=("py",))
        assert not any("hunter2" in a for a in spec.argv) and "--password" not in " ".join(spec.argv)
        assert dict(spec.env)["PDF_PASSWORD"] == "hunter2"


@given(fleet=st.integers(1, 6), gpus=st.integers(1, 8))
def test_fleet_times_gpus_covers_every_global_shard_once(fleet: int, gpus: int) -> None:
    ids = [str(g) for g in range(gpus)]
    seen = [
        s.shard_index
        for f in range(fleet)
        for s in plan_workers(["--num-shards", str(fleet), "--shard-index", str(f)], ids, ("x",))
    ]
    assert sorted(seen) == list(range(fleet * gpus))


def test_engines_per_gpu_split_the_memory_share_and_share_a_start_lock(tmp_path) -> None:
    argv = ["--output-dir", "o", "--gpu-memory-utilization", "0.8", "--engines-per-gpu", "2"]
    specs = plan_workers(argv, ["0", "1"], ("py",), engines_per_gpu=2, lock_dir=str(tmp_path))
    assert [(dict(s.env)["CUDA_VISIBLE_DEVICES"], s.shard_index, s.num_shards) for s in specs] == [
        ("0", 0, 4),
        ("0", 1, 4),
        ("1", 2, 4),
        ("1", 3, 4),
    ]
    for s in specs:
        cmd = list(s.argv)
        assert "--engines-per-gpu" not in cmd and cmd.count("--gpu-memory-utilization") == 1
        assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.4000"
    locks = [dict(s.env)["RUNNER_ENGINE_START_LOCK"] for s in specs]
    assert locks[0] == locks[1] != locks[2] == locks[3] and locks[0].startswith(str(tmp_path))
    assert {dict(s.env)["RUNNER_ENGINE_GPU_PEERS"] for s in specs} == {"2"}
    # the whole-run budget is split the same way; one engine per GPU changes nothing
    [a, _] = plan_workers(["--gpu-memory-gib", "8"], ["0"], ("py",), engines_per_gpu=2)
    assert list(a.argv)[list(a.argv).index("--gpu-memory-gib") + 1] == "4.000"
    # without a share of the user's, each engine sizes its own (profiles.shared_gpu_utilization)
    [a, _] = plan_workers(["--output-dir", "o"], ["0"], ("py",), engines_per_gpu=2)
    assert "--gpu-memory-utilization" not in a.argv
    [one] = plan_workers(["--gpu-memory-utilization", "0.8"], ["0"], ("py",))
    assert "0.8" in one.argv and "RUNNER_ENGINE_START_LOCK" not in dict(one.env)
    with pytest.raises(ValueError):
        plan_workers([], ["0"], ("py",), engines_per_gpu=0)


def test_workers_on_one_host_get_a_share_of_the_cores_for_torch_threads(monkeypatch) -> None:
    """Several engine processes on one host each get OMP_NUM_THREADS (a quarter of their share of
    the cores, at most 4), unless the operator set it; one worker alone is capped too (GPU session
    12: one plain CLI on 32 cores ran 12.9 pages/s unset, 16.7-18.3 with 4)."""
    from runner.launcher import worker_torch_threads

    assert worker_torch_threads(2, environ={}, cores=32) == "4"
    assert worker_torch_threads(8, environ={}, cores=96) == "3"
    assert worker_torch_threads(4, environ={}, cores=8) == "1"
    assert worker_torch_threads(1, environ={}, cores=32) == "4"
    assert worker_torch_threads(1, environ={}, cores=8) == "2"
    assert worker_torch_threads(2, environ={}, cores=128) == "4"
    assert worker_torch_threads(2, environ={"OMP_NUM_THREADS": "8"}, cores=32) is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    specs = plan_workers(["--output-dir", "o"], ["0", "1"], ("py",))
    assert len({dict(s.env).get("OMP_NUM_THREADS") for s in specs}) == 1
    assert int(dict(specs[0].env)["OMP_NUM_THREADS"]) >= 1
    [one] = plan_workers(["--output-dir", "o"], ["0"], ("py",))
    assert int(dict(one.env)["OMP_NUM_THREADS"]) >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert all("OMP_NUM_THREADS" not in dict(s.env) for s in plan_workers([], ["0", "1"], ("py",)))


def test_engine_process_caps_its_torch_threads_before_torch_starts() -> None:
    """``cap_torch_threads`` (the CLI calls it before anything imports torch) sets OMP_NUM_THREADS
    for this process's torch pool and every child it starts (vLLM's engine core, render workers);
    a torch imported earlier is resized; an operator's value is left alone."""
    code = (
        "import os, subprocess, sys; {pre}from runner.launcher import cap_torch_threads; "
        "t = cap_torch_threads(); import torch; "
        "child = subprocess.run([sys.executable, '-c', "
        "'import os; print(os.environ.get(\"OMP_NUM_THREADS\"))'], "
        "capture_output=True, text=True, check=True).stdout.strip(); "
        "print(t, torch.get_num_threads(), child)"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RUNNER_WORKERS_ON_HOST")}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cores = len(os.sched_getaffinity(0))
    want = str(max(1, min(4, cores // 4)))
    for pre in ("", "import torch; "):
        out = subprocess.run(
            [sys.executable, "-c", code.format(pre=pre)], env=base, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [want, want, want], (pre, out.stdout)
    out = subprocess.run(
        [sys.executable, "-c", code.format(pre="")],
        env={**base, "OMP_NUM_THREADS": "3"},
        capture_output=True,
        text=True,
    )
    t, _torch_threads, child = out.stdout.split()  # torch itself clamps to the cores it has
    assert (t, child) == ("None", "3"), out.stdout


def test_pinned_workers_get_disjoint_whole_cores(monkeypatch) -> None:
    """RUNNER_PIN_WORKERS=1 (experiment): each worker its own physical cores, hyper-thread
    siblings together, contiguous ids together; off by default."""
    from runner.launcher import parse_cpu_list, worker_cpu_sets

    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    ht = lambda c: frozenset({c % 16, c % 16 + 16})  # noqa: E731 - 16 cores x 2 threads, as Linux numbers them
    sets = worker_cpu_sets(2, range(32), ht)
    assert sets == [[*range(0, 8), *range(16, 24)], [*range(8, 16), *range(24, 32)]]
    odd = worker_cpu_sets(3, range(10), lambda c: frozenset({c}))
    assert odd == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert worker_cpu_sets(4, [0, 1], lambda c: frozenset({c})) is None  # fewer cores than workers
    # a sibling outside the allowed set is not handed out
    assert worker_cpu_sets(1, [0, 1], ht) == [[0, 1]]
    monkeypatch.delenv("RUNNER_PIN_WORKERS", raising=False)
    assert all("RUNNER_CPU_SET" not in dict(s.env) for s in plan_workers([], ["0", "1"], ("py",)))
    monkeypatch.setenv("RUNNER_PIN_WORKERS", "1")
    monkeypatch.setattr("runner.launcher.worker_cpu_sets", lambda n: [[0, 2], [1, 3]][:n])
    specs = plan_workers([], ["0", "1"], ("py",))
    assert [dict(s.env)["RUNNER_CPU_SET"] for s in specs] == ["0,2", "1,3"]


def test_a_worker_pins_itself_and_its_children_to_its_cpu_set(tmp_path) -> None:
    """The worker applies RUNNER_CPU_SET before it starts anything; a child inherits it; a set it
    may not use is reported and ignored."""
    cpu = min(os.sched_getaffinity(0))
    code = (
        "import os, subprocess, sys; from runner.launcher import apply_cpu_set; "
        "print(apply_cpu_set()); "
        "print(subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'], "
        "capture_output=True, text=True).stdout.strip())"
    )
    env = {**os.environ, "RUNNER_CPU_SET": str(cpu), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == [f"[{cpu}]", f"[{cpu}]"]
    env["RUNNER_CPU_SET"] = "100000"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert bad.stdout.split("\n")[0] == "None" and "not applied" in bad.stderr


def test_engine_start_lock_serialises_engines_sharing_a_gpu(tmp_path) -> None:
    """Two processes holding RUNNER_ENGINE_START_LOCK never start at the same time."""
    import subprocess
    import textwrap

    lock = tmp_path / "gpu0.lock"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from runner.engines.vllm_engine import _start_lock
        with _start_lock():
            print("in", time.time(), flush=True); time.sleep(1.0); print("out", time.time(), flush=True)
        """
    )
    env = {**os.environ, "RUNNER_ENGINE_START_LOCK": str(lock)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        t = {line.split()[0]: float(line.split()[1]) for line in out.split("\n") if line.strip()}
        spans.append((t["in"], t["out"]))
    spans.sort()
    assert spans[1][0] >= spans[0][1]  # the second entered after the first left


def test_merge_summaries_sums_counts_and_recomputes_rate() -> None:
    parts = {
        "shard-0-of-2": {
            "files": {"ok": 2, "failed": 1},
            "pages": {"ok": 10, "blank": 1},
            "pages_total": 11,
            "counters": {"regions": 3},
            "pages_per_s": 50.0,
            "wall_seconds": 2.0,
            "docs": [{"source": "b"}],
            "engine_startup_s": 70.0,
            "shard_balance": {"num_shards": 2},
        },
        "shard-1-of-2": {
            "files": {"ok": 3},
            "pages": {"ok": 9},
            "pages_total": 9,
            "counters": {"regions": 4},
            "pages_per_s": 60.0,
            "wall_seconds": 4.0,
            "docs": [{"source": "a"}],
            "engine_startup_s": 80.0,
        },
    }
    m = merge_summaries(parts, wall_s=10.0)
    assert m["files"] == {"failed": 1, "ok": 5}
    assert m["pages"] == {"blank": 1, "ok": 19}
    # Rates are recomputed, never summed: all pages over the longest worker's processing time ...
    assert m["pages_total"] == 20 and m["pages_per_s"] == 5.0 and m["wall_seconds"] == 4.0
    # ... and over the parent's wall time, start-up included.
    assert m["pages_per_s_incl_startup"] == 2.0 and m["parent_wall_seconds"] == 10.0
    assert m["counters"] == {"regions": 7}
    assert [d["source"] for d in m["docs"]] == ["a", "b"]
    assert m["engine_startup_s"] == 80.0 and m["shard_balance"] == {"num_shards": 2}


def _run_stub_workers(
    tmp_path: Path, stub: list[str], gpus: str, engines_per_gpu: int = 1, **kw: object
) -> tuple[int, Path]:
    out = tmp_path / "out"
    argv = ["--input-dir", str(tmp_path), "--output-dir", str(out), "--engine", "text"]
    code = run_multi_gpu(
        argv,
        gpus,
        worker_cmd=stub,
        prescan=None,
        log_dir=str(tmp_path / "logs"),
        poll_s=0.5,
        engines_per_gpu=engines_per_gpu,
        **kw,  # type: ignore[arg-type]
    )
    return code, out


FAKE_MPS = r"""#!/bin/sh
# records each call: its arguments, its stdin (for "quit") and the pipe folder it was given
{ echo "args=$*"; echo "pipe=$CUDA_MPS_PIPE_DIRECTORY"
  [ "$1" = "-d" ] || echo "stdin=$(cat)"; } >> "$FAKE_MPS_LOG"
exit "${FAKE_MPS_EXIT:-0}"
"""


def _fake_mps(tmp_path: Path) -> Path:
    fake = tmp_path / "fake-mps-control"
    fake.write_text(FAKE_MPS)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def test_mps_daemon_is_private_started_first_and_quit_at_the_end(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--mps: the control daemon starts (``-d``) with a pipe folder under the run's logs, every
    worker gets that folder, and ``quit`` goes to the same daemon when the workers are done."""
    fake = _fake_mps(tmp_path)
    record = tmp_path / "mps.log"
    monkeypatch.setenv("FAKE_MPS_LOG", str(record))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, out = _run_stub_workers(tmp_path, stub, "0", engines_per_gpu=2, mps=True, mps_binary=str(fake))
    assert code == 0
    pipe = str(tmp_path / "logs" / "mps" / "pipe")
    calls = record.read_text().splitlines()
    assert calls == ["args=-d", f"pipe={pipe}", "args=", f"pipe={pipe}", "stdin=quit"]
    seen = [json.loads((out / f"_run_summary.shard-{i}-of-2.json").read_text())["seen"] for i in range(2)]
    assert [s["mps_pipe"] for s in seen] == [pipe, pipe]


def test_mps_refused_clearly_when_the_daemon_cannot_start(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, out = _run_stub_workers(tmp_path, stub, "0", mps=True, mps_binary=str(tmp_path / "missing"))
    err = capsys.readouterr().err
    assert code == 2 and "--mps:" in err and "not found" in err
    assert not (out / "_run_summary.json").exists()
    fake = _fake_mps(tmp_path)
    monkeypatch.setenv("FAKE_MPS_LOG", str(tmp_path / "mps.log"))
    monkeypatch.setenv("FAKE_MPS_EXIT", "1")
    code, out = _run_stub_workers(tmp_path, stub, "0", mps=True, mps_binary=str(fake))
    assert code == 2 and "did not start" in capsys.readouterr().err


def test_run_multi_gpu_runs_one_worker_per_gpu_and_merges(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, out = _run_stub_workers(tmp_path, stub, "0,1,2")
    assert code == 0
    merged = json.loads((out / "_run_summary.json").read_text())
    assert merged["files"]["ok"] == 1 + 2 + 3 and merged["pages_total"] == 60
    assert [w["exit_code"] for w in merged["workers"]] == [0, 0, 0]
    assert merged["gpus"] == ["0", "1", "2"]
    seen = {
        json.loads((out / f"_run_summary.shard-{i}-of-3.json").read_text())["seen"]["cuda"] for i in range(3)
    }
    assert seen == {"0", "1", "2"}
    assert "stub shard 1 done" in (tmp_path / "logs" / "shard-1-of-3.log").read_text()


def test_engines_on_one_gpu_take_pages_only_when_all_are_ready(tmp_path, monkeypatch) -> None:
    """The K-th engine on a GPU is ready minutes after the first (start-up lock): the first waits
    for it, or goes on after the timeout."""
    import threading
    import time

    from runner.engines import vllm_engine as ve

    lock = tmp_path / "runner-engine-start-gpu0.lock"
    monkeypatch.setenv("RUNNER_ENGINE_START_LOCK", str(lock))
    monkeypatch.setenv("RUNNER_ENGINE_GPU_PEERS", "2")
    done: list[float] = []
    t = threading.Thread(
        target=lambda: (ve._wait_for_gpu_peers(timeout_s=30, poll_s=0.05), done.append(time.time()))
    )
    t.start()
    time.sleep(0.5)
    assert not done  # alone: still waiting
    peer_ready = time.time()
    (tmp_path / "runner-engine-start-gpu0.lock.ready.99999").touch()  # the other engine
    t.join(timeout=10)
    assert done and done[0] >= peer_ready
    for f in tmp_path.glob("*.ready.*"):
        f.unlink()
    t0 = time.time()
    ve._wait_for_gpu_peers(timeout_s=0.3, poll_s=0.05)  # the peer never comes: go on
    assert 0.3 <= time.time() - t0 < 5
    monkeypatch.setenv("RUNNER_ENGINE_GPU_PEERS", "1")
    t0 = time.time()
    ve._wait_for_gpu_peers(timeout_s=30)
    assert time.time() - t0 < 0.5


def test_run_multi_gpu_runs_several_engines_on_one_gpu(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, out = _run_stub_workers(tmp_path, stub, "0", engines_per_gpu=2)
    assert code == 0
    merged = json.loads((out / "_run_summary.json").read_text())
    assert merged["files"]["ok"] == 1 + 2 and [w["exit_code"] for w in merged["workers"]] == [0, 0]
    seen = [
        json.loads((out / f"_run_summary.shard-{i}-of-2.json").read_text())["seen"]["cuda"] for i in range(2)
    ]
    assert seen == ["0", "0"]


def test_run_multi_gpu_fails_when_one_worker_fails(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("STUB_FAIL_SHARD", "1")
    out = tmp_path / "out"
    code = run_multi_gpu(
        ["--output-dir", str(out)],
        ["0", "1"],
        worker_cmd=stub,
        prescan=None,
        log_dir=str(tmp_path / "logs"),
        poll_s=0.5,
    )
    assert code == 3
    merged = json.loads((out / "_run_summary.json").read_text())
    assert [(w["shard"], w["exit_code"]) for w in merged["workers"]] == [
        ("shard-0-of-2", 0),
        ("shard-1-of-2", 3),
    ]
    assert merged["merged_from"] == ["shard-0-of-2"]
    err = capsys.readouterr().err
    assert "FAILED (exit 3)" in err and "worker exploding on purpose" in err


def test_run_multi_gpu_rejects_bad_gpu_spec(tmp_path: Path, stub: list[str]) -> None:
    assert run_multi_gpu(["--output-dir", str(tmp_path)], "0,0", worker_cmd=stub, prescan=None) == 2
