"""``python -m runner`` — the same entry point as ``run_pdf_ocr_vllm.py``."""

import sys

from runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
