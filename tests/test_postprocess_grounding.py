"""Tests for postprocess.grounding: the tolerant region parser."""

from __future__ import annotations

from postprocess.grounding import normalise_label, parse_boxes, parse_grounding
from postprocess.records import PageGeometry


def test_boxes_well_formed_and_multi() -> None:
    assert parse_boxes("[[1, 2, 3, 4], [5, 6, 7, 8]]") == (((1, 2, 3, 4), (5, 6, 7, 8)), [])


def test_boxes_repaired_clamped_ordered() -> None:
    boxes, problems = parse_boxes("[[117, s 437, 377, 456]]")
    assert boxes == ((117, 437, 377, 456),) and problems
    assert parse_boxes("[[900, 1200, 100, -5]]")[0] == ((100, 0, 900, 999),)
    assert parse_boxes("((1, 2, 3, 4))")[0] == ((1, 2, 3, 4),)
    assert parse_boxes("[[1.6, 2, 3, 4]]")[0] == ((2, 2, 3, 4),)


def test_boxes_unreadable() -> None:
    for payload in ["[eq:label]", "[[1, 2, 3]]", "nonsense"]:
        boxes, problems = parse_boxes(payload)
        assert boxes == () and problems
    assert parse_boxes("[][]") == ((), [])


def test_labels_normalised() -> None:
    assert normalise_label(" Sub_Title ") == "sub_title"
    assert normalise_label("image\n_caption") == "image_caption"
    assert normalise_label("equation\ngroup") == "equation group"
    assert normalise_label("<b>x</b>!") == "bxb"
    assert normalise_label("") == "text"


def test_geometry_conversion() -> None:
    g = PageGeometry(width_px=999 * 2, height_px=999, width_pt=999.0, height_pt=499.5)
    regions, _ = parse_grounding("<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nx", g)
    assert regions[0].boxes_px == ((0, 0, 1998, 999),)
    assert regions[0].boxes_pt == ((0.0, 0.0, 999.0, 499.5),)


def test_head_text_and_plain_output_are_untagged_regions() -> None:
    regions, problems = parse_grounding("Intro line\n<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nBody")
    assert [(r.label, r.tagged, r.text) for r in regions] == [
        ("text", False, "Intro line"),
        ("text", True, "Body"),
    ]
    assert problems == []


def test_content_never_lost_in_malformed_blocks() -> None:
    raw = (
        "<|ref|>a label that is far too long to be any real label at all, really<|/ref|>tail words\n"
        "<|ref|>text<|/ref|><|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nafter <|det|>stray\n"
        "<|ref|>unknownlabel words here"
    )
    regions, problems = parse_grounding(raw)
    text = " ".join(r.text for r in regions)
    for word in ["far", "tail", "after", "stray", "unknownlabel", "words", "here"]:
        assert word in text
    assert problems


def test_cut_inside_final_label_is_not_content() -> None:
    regions, problems = parse_grounding("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nBody<|ref|>tab")
    assert [r.text for r in regions] == ["Body", ""]
    assert any("cut off" in p for p in problems)


def test_parser_never_raises_on_non_string() -> None:
    regions, problems = parse_grounding(b"bytes")  # type: ignore[arg-type]
    assert regions == [] and problems


def test_boxes_without_det_tag_and_det_without_ref() -> None:
    regions, problems = parse_grounding("<|ref|>text<|/ref|>[[1, 2, 3, 4]]<|/det|>\nBare box")
    assert [(r.boxes, r.text) for r in regions] == [(((1, 2, 3, 4),), "Bare box")]
    assert problems == ["missing <|det|>"]
    regions, problems = parse_grounding("<|det|>[[1, 2, 3, 4]]<|/det|>\nNo ref")
    assert [r.text for r in regions] == ["No ref"] and problems
    regions, _ = parse_grounding(
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nA <|det|>[[5, 6, 7, 8]]<|/det|>B"
    )
    assert regions[0].text == "A B"
