"""``python -m postprocess``: re-clean stored raw output offline (see ``postprocess.cli``)."""

from __future__ import annotations

import sys

from postprocess.cli import main

if __name__ == "__main__":
    sys.exit(main())
