#!/usr/bin/env python3
"""Single-process baseline entry point: PDF → Markdown through the Transformers engine.

Same command line as ``run_pdf_ocr_vllm.py`` (see ``--help``), as users of the seeds'
``run_pdf_ocr.py`` expect: ``--engine hf`` by default, always one render worker (the baseline is
the simple, single-process path), and DeepSeek-OCR-2 unless ``--model`` says otherwise (it is the
model Transformers implements natively).
"""

from __future__ import annotations

import sys

from runner.cli import main

BASELINE_MODEL = "deepseek-ai/DeepSeek-OCR-2"


def baseline_argv(argv: list[str]) -> list[str]:
    """``argv`` with the baseline's model default and its single render worker (argparse: last wins)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    model = [] if "--model" in given else ["--model", BASELINE_MODEL]
    return [*model, *argv, "--render-workers", "1"]


if __name__ == "__main__":
    sys.exit(main(baseline_argv(sys.argv[1:]), default_engine="hf"))
