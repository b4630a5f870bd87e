"""A render-worker hook that hangs on dark pages: stands in for a page that never finishes rendering."""

from __future__ import annotations

import time
from typing import Any


def hang_if_dark(img: Any) -> None:
    small = img.convert("L").resize((32, 32))
    if sum(small.getdata()) / 1024 < 128:
        time.sleep(3600)


def tag_resolution(img: Any, res: str = "default") -> str:
    """Returns the resolution it was configured with: shows which hook prepared a page."""
    return res
