#!/usr/bin/env bash
# Convert the bundled sample PDFs to Markdown on any machine (no GPU, no model download):
#   bash scripts/demo.sh            -> demo_out/*.md
# On a GPU machine with vLLM installed, run the same CLI with --engine vllm instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/python run_pdf_ocr_vllm.py --input-dir samples --output-dir demo_out --engine text --force "$@"
echo "Markdown written to demo_out/:"
ls -1 demo_out/*.md
