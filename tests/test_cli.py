"""The command line: usage errors, fail-fast engines, help, entry points."""

from __future__ import annotations

import subprocess
import sys

import pdfgen
from conftest import REPO

from runner.cli import EXIT_ENGINE, EXIT_USAGE, main


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--input-dir" in capsys.readouterr().out


def test_usage_errors(tmp_path):
    log = ["--log-file", str(tmp_path / "l.log")]
    assert main(["--output-dir", str(tmp_path)]) == EXIT_USAGE  # no input given
    assert main(["--input-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path), *log]) == EXIT_USAGE
    assert (
        main(["--input-dir", str(tmp_path), "--output-dir", str(tmp_path), "--dpi", "5", *log]) == EXIT_USAGE
    )
    assert (
        main(
            [
                "--input-dir",
                str(tmp_path),
                "--output-dir",
                str(tmp_path),
                "--num-shards",
                "2",
                "--shard-index",
                "2",
                *log,
            ]
        )
        == EXIT_USAGE
    )


def test_vllm_engine_fails_fast_without_vllm(tmp_path, caplog):
    pdfgen.text_pdf(tmp_path / "in" / "a.pdf", pages=1)
    code = main(
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--output-dir",
            str(tmp_path / "out"),
            "--engine",
            "vllm",
            "--progress",
            "none",
            "--log-file",
            str(tmp_path / "l.log"),
        ]
    )
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert code == EXIT_ENGINE
        msg = (tmp_path / "l.log").read_text()
        assert "pip install" in msg and "--engine" in msg
        assert not (tmp_path / "out" / "a.md").exists()


def test_text_engine_end_to_end_and_module_entry_point(tmp_path):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "--input-dir",
            str(src),
            "--output-dir",
            str(tmp_path / "o"),
            "--engine",
            "text",
            "--progress",
            "log",
            "--log-file",
            str(tmp_path / "l.log"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "o" / "a.md").read_text()
    assert "Page 1 heading" in md and "----- Page 2 -----" in md
    assert "Run summary" in r.stderr
    r2 = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_pdf_ocr_vllm.py"),
            "--input-dir",
            str(src),
            "--output-dir",
            str(tmp_path / "o"),
            "--engine",
            "text",
            "--progress",
            "none",
            "--log-file",
            str(tmp_path / "l2.log"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r2.returncode == 0 and "skip (done marker exists)" in (tmp_path / "l2.log").read_text()


def test_abbreviated_password_option_is_refused(tmp_path):
    # '--pass SECRET' would otherwise be accepted by argparse and slip past the log redaction
    code = main(
        [
            "--input-dir",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "o"),
            "--pass",
            "hunter2",
            "--log-file",
            str(tmp_path / "l.log"),
        ]
    )
    assert code == EXIT_USAGE


def test_engine_that_dies_while_starting_is_a_clear_engine_error(tmp_path, monkeypatch, caplog):
    """E.g. the warm-up batch runs out of GPU memory and vLLM's engine core dies: exit code 3 and
    one clear line, not a traceback; no output is written, so a rerun starts the PDFs again."""
    from fakes import FakeEngine

    import runner.engines as engines
    from runner.engines.base import EngineDied

    class DiesAtStart(FakeEngine):
        def start(self) -> None:
            raise EngineDied("vLLM engine core process died during warm-up: CUDA out of memory")

    monkeypatch.setattr(engines, "create_engine", lambda cfg: DiesAtStart())
    pdfgen.text_pdf(tmp_path / "in" / "a.pdf", pages=2)
    rc = main(
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--output-dir",
            str(tmp_path / "out"),
            "--log-file",
            str(tmp_path / "l.log"),
        ]
    )
    assert rc == EXIT_ENGINE
    assert "the engine did not start" in caplog.text and "out of memory" in caplog.text
    assert not (tmp_path / "out" / "a.md").exists() and not (tmp_path / "out" / "a.done").exists()


def test_gpu_memory_gib_sets_vllms_share_and_refuses_what_the_card_lacks(tmp_path, monkeypatch, capsys):
    """--gpu-memory-gib N: vLLM gets N minus what a run uses outside its budget, as a share of the
    card; the low-VRAM profile then sizes itself for that budget. Impossible budgets: usage error."""
    import argparse

    from runner import cli
    from runner.profiles import OUTSIDE_ALLOCATOR_GIB, OUTSIDE_VLLM_GIB

    monkeypatch.setattr(cli, "gpu_memory_gib", lambda: 79.18)
    pdfgen.text_pdf(tmp_path / "in" / "a.pdf", pages=1)
    args = cli.build_parser().parse_args(
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--output-dir",
            str(tmp_path / "o"),
            "--gpu-memory-gib",
            "6",
            "--profile",
            "auto",
        ]
    )
    assert isinstance(args, argparse.Namespace)
    cfg = cli.config_from_args(args, ("a.pdf",), str(tmp_path / "in"))
    ec = cfg.engine_config
    assert ec.gpu_memory_utilization == round((6 - OUTSIDE_VLLM_GIB) / 79.18, 4)
    assert ec.enable_fp8_weights and ec.max_num_batched_tokens == 1024 and ec.cpu_offload_gb == 0.0
    # the engine core's allocator is held under the run's budget (memory_cap.py)
    assert ec.torch_memory_cap_gib == round(6 - OUTSIDE_ALLOCATOR_GIB, 2)
    assert ec.gpu_memory_utilization * 79.18 < ec.torch_memory_cap_gib < 6
    code = main(
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--output-dir",
            str(tmp_path / "o"),
            "--gpu-memory-gib",
            "90",
            "--log-file",
            str(tmp_path / "l.log"),
        ]
    )
    assert code == EXIT_USAGE and "more than this GPU has" in capsys.readouterr().err


def test_engines_sharing_a_gpu_cap_their_allocators_so_together_they_fit_the_card(tmp_path, monkeypatch):
    """A worker told it is one of K engines on its GPU (RUNNER_ENGINE_GPU_PEERS, set by the
    launcher) caps its engine core's allocator at its budget plus its 1/K of what the budgets
    leave free (GPU session 7: one engine grew 6 GiB past its budget and the other ran out)."""
    import argparse

    from pytest import approx

    from runner import cli
    from runner.profiles import OUTSIDE_ALLOCATOR_GIB

    monkeypatch.setattr(cli, "gpu_memory_gib", lambda: 79.18)
    pdfgen.text_pdf(tmp_path / "in" / "a.pdf", pages=1)

    def engine_config(*extra: str):
        args = cli.build_parser().parse_args(
            ["--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "o"), *extra]
        )
        assert isinstance(args, argparse.Namespace)
        return cli.config_from_args(args, ("a.pdf",), str(tmp_path / "in")).engine_config

    assert engine_config("--gpu-memory-utilization", "0.45").torch_memory_cap_gib is None  # one engine
    monkeypatch.setenv("RUNNER_ENGINE_GPU_PEERS", "2")
    caps = engine_config("--gpu-memory-utilization", "0.45").torch_memory_cap_gib
    assert caps is not None and caps > 0.45 * 79.18
    assert 2 * (caps + OUTSIDE_ALLOCATOR_GIB) == approx(79.18, abs=0.02)
    # no share given: each of 2 engines gets (card - 0.5) / 2 - the measured excess, and K such
    # engines plus their excess fit on the card
    shared = engine_config()
    assert shared.gpu_memory_utilization == approx((79.18 - 0.5) / 2 / 79.18 - 5.9 / 79.18, abs=1e-3)
    assert 2 * (shared.gpu_memory_utilization * 79.18 + 5.9) <= 79.18 - 0.5 + 1e-6
    # --gpu-memory-gib's own cap (the launcher divides it among the engines) is kept
    assert engine_config("--gpu-memory-gib", "20").torch_memory_cap_gib == round(
        20 - OUTSIDE_ALLOCATOR_GIB, 2
    )


def test_engines_per_gpu_needs_the_launcher(tmp_path, capsys):
    code = main(["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--engines-per-gpu", "2"])
    assert code == EXIT_USAGE and "--engines-per-gpu needs --gpus" in capsys.readouterr().err
    code = main(["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--mps"])
    assert code == EXIT_USAGE and "--mps needs --gpus" in capsys.readouterr().err


def test_sigterm_closes_the_engine_keeps_what_is_written_and_exits_143(tmp_path):
    """SIGTERM becomes an exception on the main thread: the pipeline's ``finally`` closes the
    engine (vLLM's engine-core process would otherwise outlive the CLI with its GPU memory), the
    PDFs already finished stay whole with their done markers, and the exit code says what
    happened. A rerun then does only what is left."""
    import os
    import signal
    import time

    src = tmp_path / "in"
    for i in range(6):
        pdfgen.text_pdf(src / f"d{i}.pdf", pages=3)
    closed = tmp_path / "engine_closed"
    script = tmp_path / "cli_with_slow_engine.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "import runner.engines\n"
        "from fakes import FakeEngine\n"
        "class Slow(FakeEngine):\n"
        "    def close(self):\n"
        f"        open({str(closed)!r}, 'w').close()\n"
        "        super().close()\n"
        "if __name__ == '__main__':  # render workers are spawned: they import this file\n"
        "    runner.engines.create_engine = lambda cfg: Slow(delay_s=0.4, max_batch=2)\n"
        "    from runner.cli import main\n"
        "    sys.exit(main(sys.argv[1:]))\n"
    )
    args = [sys.executable, str(script), "--input-dir", str(src), "--output-dir", str(tmp_path / "o")]
    args += ["--progress", "log", "--retries", "0", "--no-large-pass", "--log-file", str(tmp_path / "l.log")]
    p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    # the first PDF is finished (its done marker comes after its Markdown: waiting for the
    # Markdown alone let a loaded CI box send the signal between the two, leaving no marker)
    while time.time() < deadline and not list((tmp_path / "o").glob("*.done")):
        time.sleep(0.1)
    assert list((tmp_path / "o").glob("*.done")), "the run never finished a PDF"
    os.kill(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143, out
    assert closed.exists(), out + (tmp_path / "l.log").read_text()
    assert "terminated (SIGTERM)" in (tmp_path / "l.log").read_text()
    done = sorted(m.stem for m in (tmp_path / "o").glob("*.done"))
    assert 0 < len(done) < 6
    for stem in done:  # a marker only beside a whole file (a Markdown without one is redone)
        assert (tmp_path / "o" / f"{stem}.md").read_text().count("Page") >= 3
    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(m.stem for m in (tmp_path / "o").glob("*.done")) == [f"d{i}" for i in range(6)]
    assert (tmp_path / "l.log").read_text().count("skip (done marker exists)") == len(done)
