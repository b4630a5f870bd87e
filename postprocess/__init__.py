"""Post-processing: raw DeepSeek-OCR output -> clean or grounded Markdown (pure functions).

The runner calls ``clean_page`` per page, ``detect_degenerate`` in its retry policy and
``join_pages`` to build ``<stem>.md``; ``python -m postprocess`` re-cleans stored raw output.
Modules: ``tokens`` (special tokens, prompt echo), ``grounding`` (region parser), ``degenerate``
(loop detection and cutting), ``tables`` (HTML table repair), ``markdown`` (canonical pass),
``sanitize`` (HTML allowlist, safe links), ``clean`` (the page pipeline), ``cli``.
"""

from __future__ import annotations

from postprocess.clean import FIGURE_MARKER, clean_page
from postprocess.degenerate import detect_degenerate
from postprocess.grounding import parse_grounding
from postprocess.markdown import join_pages
from postprocess.records import CleanOptions, PageCleanResult, PageGeometry, Region
from postprocess.tokens import strip_special_tokens

__all__ = [
    "FIGURE_MARKER",
    "CleanOptions",
    "PageCleanResult",
    "PageGeometry",
    "Region",
    "clean_page",
    "detect_degenerate",
    "join_pages",
    "parse_grounding",
    "strip_special_tokens",
]
