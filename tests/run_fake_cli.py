"""Run the real CLI in a subprocess with the deterministic FakeEngine (for kill/resume tests).

python tests/run_fake_cli.py DELAY_S CLI-ARGS...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from fakes import FakeFactory

    import runner.engines as engines
    from runner.cli import main

    engines.create_engine = FakeFactory(delay_s=float(sys.argv[1]))  # type: ignore[assignment]
    sys.exit(main(sys.argv[2:]))
