"""Tests for postprocess.clean: the page pipeline on fixtures built from OUTPUT_FORMAT.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from postprocess import CleanOptions, PageGeometry, clean_page, detect_degenerate, parse_grounding
from postprocess.audit import audit_markdown

FIXTURES = Path(__file__).parent / "fixtures" / "raw"
EXPECT: dict[str, dict] = json.loads((FIXTURES / "expectations.json").read_text(encoding="utf-8"))
GEOM = PageGeometry(width_px=1224, height_px=1584, width_pt=612.0, height_pt=792.0)


def _raw(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(EXPECT))
@pytest.mark.parametrize("mode", ["clean", "grounded"])
def test_fixture_output_is_safe_and_keeps_words(name: str, mode: str) -> None:
    exp = EXPECT[name]
    res = clean_page(_raw(name), options=CleanOptions(mode=mode), geometry=GEOM)
    assert audit_markdown(res.markdown, mode=mode) == []
    for word in exp["words"]:
        assert word in res.markdown, (word, res.markdown[:500])
    if mode == "clean":
        assert "<|" not in res.markdown and "<\uff5c" not in res.markdown
        assert not re.search(r"\[\[\d+, ?\d+, ?\d+, ?\d+\]\]", res.markdown)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_fixture_degenerate_reason(name: str) -> None:
    exp = EXPECT[name]
    assert detect_degenerate(_raw(name), stopped_by_eos=exp["stopped_by_eos"]) == exp["degenerate"]


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECT.items() if e.get("labels")))
def test_fixture_labels_and_boxes(name: str) -> None:
    exp = EXPECT[name]
    regions, _ = parse_grounding(_raw(name))
    assert [r.label for r in regions] == exp["labels"]
    if "boxes" in exp:
        assert [[list(b) for b in r.boxes] for r in regions] == exp["boxes"]


def test_degenerate_fixtures_are_cut_with_counters() -> None:
    res = clean_page(_raw("degenerate_repeated_box"))
    assert res.markdown.count("The committee approved the minutes.") == 1
    assert res.counters["loops_cut"] == 119
    res = clean_page(_raw("degenerate_pmatrix"))
    assert res.counters["latex_blocks_cut"] == 1
    assert "pmatrix" not in res.markdown and "<!-- latex omitted -->" in res.markdown
    res = clean_page(_raw("degenerate_line_of_ones"))
    assert res.markdown.split("\n").count("1") == 1
    res = clean_page(_raw("degenerate_tiny_images"))
    assert res.markdown == "<!-- figure -->"
    assert res.counters["figures"] == 137


def test_wellformed_page_clean_mode_shape() -> None:
    links: list[tuple[int, tuple[int, int, int, int]]] = []

    def link(i: int, box: tuple[int, int, int, int]) -> str:
        links.append((i, box))
        return f"paper_assets/p0001_fig{i + 1:02d}.png"

    res = clean_page(_raw("wellformed_paper"), options=CleanOptions(), geometry=GEOM, figure_link=link)
    md = res.markdown
    # Reading order is kept.
    order = [
        md.index(s)
        for s in (
            "# Measuring",
            "We describe",
            "## 2 Method",
            "\\[ T",
            "Table 1",
            "<table>",
            "![figure 1]",
            "Figure 2",
        )
    ]
    assert order == sorted(order)
    assert "[^12]" in md and "<sup>12</sup>" not in md
    assert "<center>" not in md
    assert "Weir &amp; gate" in md
    assert "None" not in md and res.counters["placeholder_cells_pruned"] == 1
    assert links == [(0, GEOM.to_px((112, 540, 887, 860)))]
    assert res.counters["special_tokens_removed"] == 1  # the EOS
    assert res.counters["figures"] == res.counters["figures_linked"] == 1
    assert res.problems == ()


def test_figure_marker_without_link_and_odd_link_names() -> None:
    raw = "<|ref|>image<|/ref|><|det|>[[10, 10, 500, 500]]<|/det|>\n"
    assert clean_page(raw, geometry=GEOM).markdown == "<!-- figure -->"
    assert clean_page(raw, geometry=GEOM, figure_link=lambda i, b: None).markdown == "<!-- figure -->"
    md = clean_page(raw, geometry=GEOM, figure_link=lambda i, b: "my doc (v2)_assets/f.png").markdown
    assert md == "![figure 1](my%20doc%20%28v2%29_assets/f.png)"
    md = clean_page(raw, geometry=GEOM, figure_link=lambda i, b: "javascript:alert(1)_assets/f.png").markdown
    assert md == "![figure 1](./javascript:alert%281%29_assets/f.png)"
    assert audit_markdown(md) == []


def test_grounded_mode_normalises_tags_and_boxes() -> None:
    res = clean_page(_raw("malformed_box_letter"), options=CleanOptions(mode="grounded"), geometry=GEOM)
    assert res.markdown.split("\n")[0] == "<|ref|>text<|/ref|><|det|>[[117, 437, 377, 456]]<|/det|>"
    assert res.regions[0].boxes_pt == (GEOM.to_pt((117, 437, 377, 456)),)
    res = clean_page(_raw("malformed_label_two_lines"), options=CleanOptions(mode="grounded"))
    assert res.markdown.startswith("<|ref|>table_caption<|/ref|><|det|>[[10, 20, 300, 40]]<|/det|>\n")
    # Untagged text gets a well-formed block with an empty box list.
    res = clean_page("plain words", options=CleanOptions(mode="grounded"))
    assert res.markdown == "<|ref|>text<|/ref|><|det|>[]<|/det|>\nplain words"


def test_grounded_mode_is_sanitized_too() -> None:
    raw = (
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n"
        '<script>alert(1)</script><img src=x onerror="a()">ok'
    )
    res = clean_page(raw, options=CleanOptions(mode="grounded"))
    assert "script" not in res.markdown and "onerror" not in res.markdown and res.markdown.endswith("\nok")
    raw = "<|ref|>te<script>xt<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nbody"
    res = clean_page(raw, options=CleanOptions(mode="grounded"))
    assert audit_markdown(res.markdown, mode="grounded") == []


def test_table_format_markdown_only_without_spans() -> None:
    md = clean_page(
        _raw("malformed_table_unbalanced"), options=CleanOptions(table_format="markdown")
    ).markdown
    assert md.startswith("| Year | Count |\n|---|---|\n| 2019 |  |\n| 2020 | 17 &lt; 20 |")
    md = clean_page(_raw("table_spans"), options=CleanOptions(table_format="markdown")).markdown
    assert md.startswith("<table>") and 'rowspan="2"' in md and 'colspan="2"' in md


def test_empty_table_dropped_and_counted() -> None:
    res = clean_page(_raw("table_all_filler"))
    assert "<table" not in res.markdown
    assert res.markdown == "Text after an empty table."
    assert res.counters["tables_dropped"] == 1
    assert res.counters["placeholder_cells_pruned"] == 4


def test_prompt_echo_and_tokens_removed() -> None:
    res = clean_page(_raw("prompt_echo"))
    assert res.markdown == "Echoed prompt page."
    assert res.counters["prompt_echo_removed"] == 1


def test_never_raises_on_odd_input() -> None:
    for raw in [
        "",
        "\x00",
        "<|ref|>",
        "<|det|>",
        "<|/det|>[[",
        "<table>",
        "</table><td>",
        "\\[",
        "<" * 1000,
        "<|ref|>" * 200,
        "]]" * 50,
        "\ud800",
        "<sup>1</sup>" * 3,
    ]:
        res = clean_page(raw)
        assert isinstance(res.markdown, str)
        assert audit_markdown(res.markdown) == []
    res = clean_page(None)  # type: ignore[arg-type]
    assert res.markdown == "" and res.problems


def test_internal_error_falls_back_to_sanitized_text(monkeypatch: pytest.MonkeyPatch) -> None:
    import postprocess.clean as clean_mod

    def boom(*a: object, **k: object) -> object:
        raise RuntimeError("synthetic")

    monkeypatch.setattr(clean_mod, "_render", boom)
    res = clean_page("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nkept <script>x</script>")
    assert res.markdown == "kept"
    assert res.counters["internal_errors"] == 1
    assert any("synthetic" in p for p in res.problems)


def test_repeated_text_under_different_boxes_kept_once_but_pairs_kept() -> None:
    rows = "".join(
        f"<|ref|>text<|/ref|><|det|>[[1, {i}, 9, {i + 1}]]<|/det|>\nSame line.\n" for i in range(5)
    )
    res = clean_page(rows)
    assert res.markdown == "Same line." and res.counters["loops_cut"] == 4
    two = "".join(f"<|ref|>text<|/ref|><|det|>[[1, {i}, 9, {i + 1}]]<|/det|>\nTwice.\n" for i in range(2))
    assert clean_page(two).markdown == "Twice.\n\nTwice."


def test_centered_title_becomes_heading_and_huge_input_is_cut() -> None:
    res = clean_page("<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<center>Big Title</center>")
    assert res.markdown == "# Big Title"
    res = clean_page("word " * 300_000)
    assert res.problems and len(res.markdown) <= 1_000_000
    assert detect_degenerate("x" * 1_000_001) == "too_long"


def test_grounded_mode_links_saved_figures() -> None:
    raw = "<|ref|>image<|/ref|><|det|>[[10, 10, 500, 500]]<|/det|>\n"
    opts = CleanOptions(mode="grounded")
    md = clean_page(raw, options=opts, geometry=GEOM, figure_link=lambda i, b: "d_assets/f.png").markdown
    assert md == "<|ref|>image<|/ref|><|det|>[[10, 10, 500, 500]]<|/det|>\n![figure 1](d_assets/f.png)"
    assert clean_page(raw, options=opts, geometry=GEOM).markdown == raw.strip()
