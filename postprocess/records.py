"""Post-processing stage: typed records crossing the ``postprocess`` boundary.

Flow: the runner hands raw engine text plus an optional ``PageGeometry`` and ``CleanOptions`` to
``clean_page``; it gets a ``PageCleanResult`` back (Markdown, parsed ``Region`` records, counters
and the problems the parser met). Everything here is frozen and free of I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Box = tuple[int, int, int, int]
FloatBox = tuple[float, float, float, float]

MODES = ("clean", "grounded")
TABLE_FORMATS = ("html", "markdown")


@dataclass(frozen=True)
class CleanOptions:
    """How to clean one page. ``sanitize`` is always on in the product; tests may turn it off."""

    mode: str = "clean"  # "clean" | "grounded"
    table_format: str = "html"  # "html" | "markdown" (pipe tables only when no row/col spans)
    sanitize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.table_format not in TABLE_FORMATS:
            raise ValueError(f"table_format must be one of {TABLE_FORMATS}, got {self.table_format!r}")


@dataclass(frozen=True)
class PageGeometry:
    """Size of the rendered page image the model saw and of the PDF page, to convert boxes."""

    width_px: int
    height_px: int
    width_pt: float
    height_pt: float

    def __post_init__(self) -> None:
        if self.width_px <= 0 or self.height_px <= 0 or self.width_pt <= 0 or self.height_pt <= 0:
            raise ValueError(f"page geometry must be positive, got {self!r}")

    def to_px(self, box: Box) -> Box:
        # Upstream DeepSeek-OCR scales normalised coordinates by ``/ 999`` (not 1000).
        x1, y1, x2, y2 = box
        return (
            round(x1 / 999 * self.width_px),
            round(y1 / 999 * self.height_px),
            round(x2 / 999 * self.width_px),
            round(y2 / 999 * self.height_px),
        )

    def to_pt(self, box: Box) -> FloatBox:
        x1, y1, x2, y2 = box
        return (
            round(x1 / 999 * self.width_pt, 2),
            round(y1 / 999 * self.height_pt, 2),
            round(x2 / 999 * self.width_pt, 2),
            round(y2 / 999 * self.height_pt, 2),
        )


@dataclass(frozen=True)
class Region:
    """One layout block of a page: label, boxes (0-999 and, when geometry is known, px/pt), text.

    ``tagged`` is False for text the model wrote outside any ``<|ref|>`` block (plain-OCR output,
    or text before the first block).
    """

    label: str
    boxes: tuple[Box, ...]
    boxes_px: tuple[Box, ...]
    boxes_pt: tuple[FloatBox, ...]
    text: str
    tagged: bool = True


@dataclass(frozen=True)
class PageCleanResult:
    """What ``clean_page`` returns for one page."""

    markdown: str
    regions: tuple[Region, ...]
    counters: dict[str, int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
