"""Blank-page detection (runs inside render workers).

A page is blank when the PDF itself has nothing on it, or when it only carries images/drawings
whose ink is negligible. The model hallucinates on blank pages, so they never reach an engine.

Rules, in order (conservative: real content is never skipped):
1. Any non-whitespace character in the text layer → not blank. A page number or a faint vector
   watermark is content; the engine reads it.
2. Nothing painted at all (MuPDF's bbox log is empty: no text, images — inline ones included —,
   paths or shadings) → blank ("no content": e.g. a content stream of only ``q Q``).
3. Otherwise ink coverage on a 2×2-averaged grayscale render: a pixel is ink when the average is
   darker than ``INK_LEVEL`` (160/255) *and* at least one 4-neighbour is ink too. Averaging and
   the neighbour rule remove isolated scanner specks; light watermarks (> 160) never count. The
   page is blank when the ink fraction is below ``threshold`` (default 2e-5: ~10 ink pixels on
   an A4 page at 144 dpi, less than a scanned page number).
"""

from __future__ import annotations

from typing import Any

import numpy as np

INK_LEVEL = 160
DEFAULT_THRESHOLD = 2e-5


def ink_fraction(gray: np.ndarray) -> float:
    """Fraction of ink pixels in a 2-D uint8 grayscale image (see module docstring)."""
    h, w = gray.shape
    h2, w2 = h // 2 * 2, w // 2 * 2
    if h2 == 0 or w2 == 0:
        return 0.0
    g = gray[:h2, :w2].astype(np.uint16)
    avg = (g[0::2, 0::2] + g[1::2, 0::2] + g[0::2, 1::2] + g[1::2, 1::2]) // 4
    ink = avg < INK_LEVEL
    nb = np.zeros_like(ink)
    nb[1:, :] |= ink[:-1, :]
    nb[:-1, :] |= ink[1:, :]
    nb[:, 1:] |= ink[:, :-1]
    nb[:, :-1] |= ink[:, 1:]
    return float((ink & nb).sum()) / ink.size


def _gray_from_pixmap(pix: Any) -> np.ndarray:
    arr = np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.width, pix.n)
    if pix.n >= 3:
        # ITU-R 601 luma, integer arithmetic
        r, g, b = arr[..., 0].astype(np.uint32), arr[..., 1].astype(np.uint32), arr[..., 2].astype(np.uint32)
        return ((r * 299 + g * 587 + b * 114) // 1000).astype(np.uint8)
    return arr[..., 0]


def detect_blank(
    page: Any, pix: Any | None, text: str, threshold: float = DEFAULT_THRESHOLD
) -> tuple[bool, str]:
    """(is_blank, reason) for a PyMuPDF page; ``pix`` is its render if one was made."""
    if text.strip():
        return False, "text"
    # MuPDF's bbox log lists everything the page paints: text, paths, shadings, images —
    # inline images (BI … ID … EI) too, which get_images() and get_cdrawings() do not see.
    if not page.get_bboxlog():
        # Annotations/forms can still draw; fall through to ink when there are any.
        if not any(True for _ in page.annots()) and not any(True for _ in page.widgets()):
            return True, "no content"
    if pix is None:
        import pymupdf

        # Same geometry as the engine render (144 dpi) so the threshold means the same.
        pix = page.get_pixmap(matrix=pymupdf.Matrix(2, 2), alpha=False, colorspace=pymupdf.csGRAY)
    frac = ink_fraction(_gray_from_pixmap(pix))
    return frac < threshold, f"ink {frac:.2e}"
