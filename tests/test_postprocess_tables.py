"""Tests for postprocess.tables: repair, placeholder pruning, rendering."""

from __future__ import annotations

from postprocess.tables import clean_table, parse_table, prune_placeholders, render_html, render_markdown


def test_repair_missing_closing_tags() -> None:
    table, repaired = parse_table("<table><tr><td>a<td>b<tr><td>c</td><td>d")
    assert [[c.text() for c in r] for r in table.rows] == [["a", "b"], ["c", "d"]]
    assert repaired >= 3
    html = render_html(table)
    assert html == "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"


def test_cells_outside_rows_and_stray_text_kept() -> None:
    table, _ = parse_table("<table>loose words<td>x</td></table>")
    assert [[c.text() for c in r] for r in table.rows] == [["x"]]
    assert table.stray_text == ["loose words"]
    out, stray, counters = clean_table("<table>loose words<td>x</td></table>", table_format="html")
    assert stray == ["loose words"] and out.startswith("<table>") and counters["tags_repaired"] >= 1


def test_entities_decoded_once_and_reencoded() -> None:
    out, _, _ = clean_table(
        "<table><tr><td>a &lt; b & c &amp; d&nbsp;e</td></tr></table>", table_format="html"
    )
    assert out == "<table><tr><td>a &lt; b &amp; c &amp; d e</td></tr></table>"


def test_placeholders_pruned_rows_and_columns_dropped() -> None:
    table, _ = parse_table(
        "<table><tr><td>k</td><td>None</td><td>v</td></tr><tr><td>N/A</td><td>-</td><td> </td></tr>"
        "<tr><td>x</td><td>\u2014</td><td>1</td></tr></table>"
    )
    counters = prune_placeholders(table)
    assert counters == {"placeholder_cells_pruned": 5, "table_rows_dropped": 1, "table_cols_dropped": 1}
    assert [[c.text() for c in r] for r in table.rows] == [["k", "v"], ["x", "1"]]


def test_real_values_not_pruned() -> None:
    table, _ = parse_table("<table><tr><td>-5</td><td>None of them</td><td>0</td></tr></table>")
    assert prune_placeholders(table)["placeholder_cells_pruned"] == 0


def test_empty_table_dropped() -> None:
    out, _, counters = clean_table("<table><tr><td>None</td><td></td></tr></table>", table_format="html")
    assert out == "" and counters["tables_dropped"] == 1


def test_spans_kept_and_sanitised_numbers() -> None:
    out, _, _ = clean_table(
        '<table><tr><td rowspan="2" onclick="x">a</td><td colspan=3>b</td>'
        '<td rowspan="x">c</td></tr></table>',
        table_format="markdown",
    )
    assert out == '<table><tr><td rowspan="2">a</td><td colspan="3">b</td><td>c</td></tr></table>'


def test_markdown_pipe_table() -> None:
    table, _ = parse_table(
        "<table><thead><tr><th>h|1</th><th>h2</th></tr></thead><tr><td>a<br>b</td></tr></table>"
    )
    assert render_markdown(table) == "| h\\|1 | h2 |\n|---|---|\n| a<br>b |  |"


def test_thead_tbody_rendered_balanced() -> None:
    table, _ = parse_table(
        "<table><thead><tr><th>h</th></tr></thead><tbody><tr><td>v</td></tr></tbody></table>"
    )
    assert render_html(table) == (
        "<table><thead><tr><th>h</th></tr></thead><tbody><tr><td>v</td></tr></tbody></table>"
    )


def test_caption() -> None:
    out, _, _ = clean_table(
        "<table><caption>Cap</caption><tr><td>v</td></tr></table>", table_format="markdown"
    )
    assert out == "Cap\n\n| v |\n|---|"
