"""How much of the main process a page costs on its way in (tooling, CPU; no GPU, no model).

Runs the real CLI with the test suite's FakeEngine (instant answers) and the vLLM engine's
preprocessing hook in the render workers, so each page carries what it carries on a GPU run
(~6 MB of pixels + ~21 MB of preprocessed tensors), once through pipes (``RUNNER_NO_SHM=1``) and
once through ``/dev/shm``; prints the main process' CPU time per page for each. The main process
also feeds vLLM and runs the scheduler, so this is the host-side ceiling on how fast pages enter
the engine (NOTES.md, "After GPU session 2").

    python tools/bench_ingest.py --pages 48 --render-workers 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
sys.path[:0] = [{tests!r}, {repo!r}]
from fakes import FakeFactory
import runner.engines as engines
from runner.cli import main
engines.create_engine = FakeFactory(worker_hook=("runner.vllm_plugin.preprocess:worker_hook",
    {{"base_size": 1024, "image_size": 640, "crop_mode": True, "strategy": "v1"}}))
t0, c0 = time.time(), time.process_time()
rc = main(sys.argv[1:])
print("RESULT", rc, time.process_time() - c0, time.time() - t0)
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=48)
    ap.add_argument("--render-workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    import pdfgen

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        src = Path(tmp) / "in"
        pdfgen.text_pdf(src / "a.pdf", pages=a.pages)
        code = CHILD.format(tests=str(REPO / "tests"), repo=str(REPO))
        for _ in range(a.repeats):
            for no_shm in ("1", "0"):
                cli = ["--input-dir", str(src), "--output-dir", f"{tmp}/out{no_shm}", "--engine", "vllm"]
                cli += ["--progress", "none", "--render-workers", str(a.render_workers), "--force"]
                cli += ["--no-large-pass", "--log-file", f"{tmp}/run.log"]
                env = {**os.environ, "RUNNER_NO_SHM": no_shm}
                out = subprocess.run(
                    [sys.executable, "-c", code, *cli], capture_output=True, text=True, env=env, check=False
                )
                res = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
                if not res:
                    print(out.stdout[-2000:], out.stderr[-2000:])
                    return 1
                _, rc, cpu, wall = res[0]
                transport = "pipes" if no_shm == "1" else "/dev/shm"
                print(
                    f"{transport:9s} rc {rc}: main process {float(cpu) / a.pages * 1000:.1f} ms CPU/page, "
                    f"{a.pages / float(wall):.2f} pages/s with {a.render_workers} render workers"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
