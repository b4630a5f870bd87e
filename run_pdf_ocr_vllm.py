#!/usr/bin/env python3
"""PDF → Markdown with DeepSeek-OCR on vLLM. Same entry point as ``python -m runner``."""

import sys

from runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
