"""Blank detection on near-blank pages: real content must never be skipped."""

from __future__ import annotations

import numpy as np
import pdfgen
import pymupdf
import pytest

from runner.blank import detect_blank, ink_fraction


def _blank(path, index=0):
    doc = pymupdf.open(path)
    page = doc[index]
    pix = page.get_pixmap(dpi=144, alpha=False, colorspace=pymupdf.csRGB)
    return detect_blank(page, pix, page.get_text("text"))


@pytest.mark.parametrize(
    ("kind", "blank"),
    [("blank", True), ("text", False), ("number", False), ("watermark", False), ("table", False)],
)
def test_vector_pages(tmp_path, kind, blank):
    p = pdfgen.pdf_with_pages(tmp_path / "p.pdf", [kind])
    assert _blank(p)[0] is blank


def test_empty_content_stream_is_blank_without_rendering(tmp_path):
    p = pdfgen.pdf_with_pages(tmp_path / "p.pdf", ["blank"])
    page = pymupdf.open(p)[0]
    assert detect_blank(page, None, "") == (True, "no content")


def test_scan_with_only_noise_is_blank(tmp_path):
    p = pdfgen.image_only_pdf(tmp_path / "noise.pdf", text="", noise=0.002)
    is_blank, reason = _blank(p)
    assert is_blank, reason


def test_scan_with_faint_background_is_blank(tmp_path):
    p = pdfgen.image_only_pdf(tmp_path / "faint.pdf", text="WATERMARK", gray=225, fontsize=60)
    assert _blank(p)[0]


@pytest.mark.parametrize("fontsize", [9, 14, 24])
def test_scanned_text_is_never_blank(tmp_path, fontsize):
    p = pdfgen.image_only_pdf(tmp_path / "s.pdf", text="12", fontsize=fontsize, noise=0.001)
    is_blank, reason = _blank(p)
    assert not is_blank, reason


def test_scanned_line_of_grey_text_is_not_blank(tmp_path):
    p = pdfgen.image_only_pdf(tmp_path / "g.pdf", text="A line of grey text on a scan", gray=120)
    assert not _blank(p)[0]


def test_ink_fraction_ignores_isolated_specks():
    img = np.full((200, 200), 255, np.uint8)
    img[::17, ::13] = 0  # isolated single-pixel specks
    assert ink_fraction(img) == 0.0
    img[50:60, 50:80] = 0  # a solid stroke
    assert ink_fraction(img) > 0.0


def test_inline_image_scan_is_not_blank(tmp_path):
    """An inline image (BI … ID … EI) is content even though get_images() does not list it."""
    doc = pymupdf.open()
    page = doc.new_page()
    stream = b"q 300 0 0 300 100 100 cm BI /W 40 /H 40 /CS /G /BPC 8 ID " + bytes(1600) + b" EI Q"
    xref = doc.get_new_xref()
    doc.update_object(xref, "<< >>")
    doc.update_stream(xref, stream)
    doc.xref_set_key(page.xref, "Contents", f"{xref} 0 R")
    path = tmp_path / "inline.pdf"
    doc.save(path)
    is_blank, reason = _blank(path)
    assert not is_blank, reason
