"""Run the CLI with the fake engine in this process and print the peak RSS (KiB) at the end."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from fakes import FakeFactory

    import runner.engines as engines
    from runner.cli import main

    engines.create_engine = FakeFactory()  # type: ignore[assignment]
    code = main(sys.argv[1:])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    sys.exit(code)
