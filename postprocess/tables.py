"""Post-processing stage: HTML table repair, placeholder pruning and Markdown pipe tables.

In: the HTML of one table as the model wrote it (unbalanced tags, missing ``</td>``/``</tr>``/
``</table>``, entities, filler cells). Out: a ``Table`` model, rendered back as balanced HTML or
as a GitHub pipe table (only when no cell spans rows or columns), plus counters. Cell content
keeps inline markup; the sanitizer runs over the rendered HTML afterwards.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

# Written so that no two ``\s*`` meet: ``<\s*(/?)\s*`` was quadratic on ``<`` + 20k spaces (fuzzer).
_TAG_RE = re.compile(r"<\s*(?:(/)\s*)?(table|thead|tbody|tfoot|tr|td|th|caption)\b([^<>]*)(>|(?=<)|\Z)", re.I)
_SPAN_RE = re.compile(r"\b(rowspan|colspan)\s*=\s*(?:[\"']\s*)?(\d{1,4})", re.I)
_INLINE_TAG_RE = re.compile(r"<[^<>]*>")
_BR_RE = re.compile(r"<\s*br\s*(?:/\s*)?>", re.I)
PLACEHOLDERS = frozenset(
    {"none", "n/a", "n.a.", "na", "null", "nan", "-", "--", "---", "\u2013", "\u2014", "\u2212", "\u2012"}
)
MAX_SPAN = 100


@dataclass
class Cell:
    tag: str  # "td" | "th"
    html: str  # inner HTML as written (entities untouched)
    rowspan: int = 1
    colspan: int = 1

    def text(self) -> str:
        return " ".join(html.unescape(_INLINE_TAG_RE.sub(" ", _BR_RE.sub(" ", self.html))).split())


@dataclass
class Table:
    caption: str = ""
    rows: list[list[Cell]] = field(default_factory=list)
    header_rows: int = 0  # rows that came from <thead>
    stray_text: list[str] = field(default_factory=list)  # text found between cells

    @property
    def has_spans(self) -> bool:
        return any(c.rowspan > 1 or c.colspan > 1 for row in self.rows for c in row)

    def is_empty(self) -> bool:
        return not self.caption.strip() and not any(c.text() for row in self.rows for c in row)


def _spans(attrs: str) -> tuple[int, int]:
    rs = cs = 1
    for name, val in _SPAN_RE.findall(attrs):
        v = max(1, min(MAX_SPAN, int(val)))
        if name.lower() == "rowspan":
            rs = v
        else:
            cs = v
    return rs, cs


def parse_table(src: str) -> tuple[Table, int]:
    """Parse one table tolerantly. Returns the table and how many tags had to be repaired
    (implied closes, tags never closed, cells outside rows)."""
    table = Table()
    repaired = 0
    row: list[Cell] | None = None
    cell: Cell | None = None
    in_caption = False
    in_thead = False
    pos = 0
    closed_table = False

    def flush_text(text: str) -> None:
        if cell is not None:
            cell.html += text
        elif in_caption:
            table.caption += text
        elif text.strip():
            table.stray_text.append(text.strip())

    def close_cell() -> None:
        nonlocal cell
        cell = None

    def close_row() -> None:
        nonlocal row
        close_cell()
        if row is not None:
            table.rows.append(row)
            if in_thead:
                table.header_rows = len(table.rows)
        row = None

    for m in _TAG_RE.finditer(src):
        flush_text(src[pos : m.start()])
        pos = m.end()
        closing, name, attrs, end = m.group(1) == "/", m.group(2).lower(), m.group(3), m.group(4)
        if end != ">":
            repaired += 1
        if name in ("td", "th"):
            if closing:
                if cell is None:
                    repaired += 1
                close_cell()
                continue
            if cell is not None:
                repaired += 1  # previous cell never closed
            if row is None:
                repaired += 1  # cell outside a row
                row = []
            if in_caption:
                in_caption = False
                repaired += 1
            rs, cs = _spans(attrs)
            cell = Cell(name, "", rs, cs)
            row.append(cell)
        elif name == "tr":
            if closing:
                if row is None:
                    repaired += 1
                close_row()
            else:
                if row is not None:
                    repaired += 1
                    close_row()
                row = []
        elif name == "caption":
            if closing:
                in_caption = False
            else:
                close_row()
                in_caption = True
        elif name in ("thead", "tbody", "tfoot"):
            if row is not None:
                repaired += 1 if cell is not None or not closing else 0
                close_row()
            in_thead = name == "thead" and not closing
        elif name == "table" and closing:
            if row is not None:
                repaired += 1 if cell is not None else 0
            close_row()
            closed_table = True
            flush_text(src[pos:])
            pos = len(src)
            break
    if pos < len(src):
        flush_text(src[pos:])
    if row is not None:
        repaired += 1
        close_row()
    if not closed_table:
        repaired += 1
    return table, repaired


def prune_placeholders(table: Table) -> dict[str, int]:
    """Empty placeholder cells (``None``, ``N/A``, dash filler), then drop rows and (when no cell
    spans) columns with no text left. Returns counters."""
    pruned = 0
    for row in table.rows:
        for c in row:
            t = c.text()
            if t and t.lower() in PLACEHOLDERS:
                c.html = ""
                pruned += 1
            elif not t and c.html:
                c.html = ""  # whitespace, &nbsp; or <br> only
                pruned += 1
    rows_before = len(table.rows)
    if not table.has_spans:
        kept = [r for r in table.rows if any(c.text() for c in r)]
        header = sum(1 for r in table.rows[: table.header_rows] if any(c.text() for c in r))
        table.rows, table.header_rows = kept, header
    cols_dropped = 0
    if not table.has_spans and table.rows:
        width = max(len(r) for r in table.rows)
        empty_cols = [j for j in range(width) if not any(j < len(r) and r[j].text() for r in table.rows)]
        if empty_cols and len(empty_cols) < width:
            drop = set(empty_cols)
            table.rows = [[c for j, c in enumerate(r) if j not in drop] for r in table.rows]
            cols_dropped = len(empty_cols)
    return {
        "placeholder_cells_pruned": pruned,
        "table_rows_dropped": rows_before - len(table.rows),
        "table_cols_dropped": cols_dropped,
    }


def _cell_html(cell_html: str) -> str:
    # Re-encode text consistently: decode entities once, escape &, <, > in text, keep tags.
    parts: list[str] = []
    pos = 0
    for m in _INLINE_TAG_RE.finditer(cell_html):
        parts.append(html.escape(html.unescape(cell_html[pos : m.start()]), quote=False))
        parts.append(m.group(0))
        pos = m.end()
    parts.append(html.escape(html.unescape(cell_html[pos:]), quote=False))
    return " ".join("".join(parts).split())


def render_html(table: Table) -> str:
    """Balanced HTML: ``<table>``, optional ``<caption>``, ``<thead>``/``<tbody>`` when the model
    used them, ``<tr>``/``<td>``/``<th>`` with numeric spans only."""
    out = ["<table>"]
    if table.caption.strip():
        out.append(f"<caption>{_cell_html(table.caption)}</caption>")
    body_open = False
    for i, row in enumerate(table.rows):
        if table.header_rows and i == 0:
            out.append("<thead>")
        if table.header_rows and i == table.header_rows:
            out.append("</thead>")
        if table.header_rows and i == table.header_rows and not body_open:
            out.append("<tbody>")
            body_open = True
        cells = []
        for c in row:
            attrs = (f' rowspan="{c.rowspan}"' if c.rowspan > 1 else "") + (
                f' colspan="{c.colspan}"' if c.colspan > 1 else ""
            )
            cells.append(f"<{c.tag}{attrs}>{_cell_html(c.html)}</{c.tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    if table.header_rows and table.header_rows >= len(table.rows) and table.rows:
        out.append("</thead>")
    if body_open:
        out.append("</tbody>")
    out.append("</table>")
    return "".join(out)


def _md_cell(cell_html: str) -> str:
    # Entities are kept as written: Markdown renders them, and decoding ``&lt;script&gt;`` would
    # turn text into markup.
    s = " ".join(_BR_RE.sub("<br>", cell_html).split())
    return s.replace("\\", "\\\\").replace("|", "\\|") if "|" in s else s


def render_markdown(table: Table) -> str:
    """GitHub pipe table; the first row (or the ``<thead>`` row) is the header. Callers must
    check ``has_spans`` first."""
    if not table.rows:
        return ""
    width = max(len(r) for r in table.rows)
    lines = []
    if table.caption.strip():
        lines.append(_md_cell(table.caption))
        lines.append("")
    for i, row in enumerate(table.rows):
        cells = [_md_cell(c.html) for c in row] + [""] * (width - len(row))
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join(["---"] * width) + "|")
    return "\n".join(lines)


TABLE_BLOCK_RE = re.compile(r"<\s*table\b[^<>]*>?.*?(?:<\s*/\s*table\s*>|\Z)", re.S | re.I)


def clean_table(src: str, *, table_format: str) -> tuple[str, list[str], dict[str, int]]:
    """Repair, prune and render one table. Returns (rendered table or "" when dropped, stray text
    found inside the table that must be kept, counters)."""
    table, repaired = parse_table(src)
    counters = prune_placeholders(table)
    counters["tags_repaired"] = repaired
    counters["tables"] = 1
    if table.is_empty():
        counters["tables_dropped"] = 1
        return "", table.stray_text, counters
    if table_format == "markdown" and not table.has_spans:
        return render_markdown(table), table.stray_text, counters
    return render_html(table), table.stray_text, counters
