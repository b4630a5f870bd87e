"""PDF generators for tests: the project's own test PDFs are written here with PyMuPDF."""

from __future__ import annotations

from pathlib import Path

import pymupdf

A4 = pymupdf.paper_rect("a4")


def text_pdf(path: Path, pages: int = 3, prefix: str = "Page") -> Path:
    doc = pymupdf.open()
    for i in range(pages):
        p = doc.new_page(width=A4.width, height=A4.height)
        p.insert_text((72, 100), f"{prefix} {i + 1} heading", fontsize=18)
        p.insert_textbox(
            pymupdf.Rect(72, 130, A4.width - 72, 400),
            f"Body text of {prefix.lower()} {i + 1}. The quick brown fox jumps over the lazy dog.",
            fontsize=11,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path)
    return path


def image_only_pdf(
    path: Path,
    text: str = "Scanned text line",
    noise: float = 0.0,
    gray: int = 0,
    fontsize: float = 18,
    seed: int = 0,
) -> Path:
    """A page that is one image and no text layer (a scan). ``noise`` = fraction of random 1-px
    dark specks; ``gray`` = ink level of the text (0 black .. 255 white)."""
    import numpy as np

    src = pymupdf.open()
    sp = src.new_page(width=A4.width, height=A4.height)
    if text:
        c = gray / 255
        sp.insert_text((72, 120), text, fontsize=fontsize, color=(c, c, c))
    pix = sp.get_pixmap(dpi=144, colorspace=pymupdf.csGRAY)
    arr = np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.width).copy()
    if noise:
        rng = np.random.default_rng(seed)
        mask = rng.random(arr.shape) < noise
        arr[mask] = 0
    pm = pymupdf.Pixmap(pymupdf.csGRAY, pix.width, pix.height, arr.tobytes(), False)
    doc = pymupdf.open()
    page = doc.new_page(width=A4.width, height=A4.height)
    page.insert_image(page.rect, pixmap=pm)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path, deflate=True)
    return path


def pdf_with_pages(path: Path, kinds: list[str]) -> Path:
    """One page per entry: 'text', 'blank', 'number' (page number only), 'watermark' (faint vector
    text), 'dark' (black page with white text), 'table' (ruled table)."""
    doc = pymupdf.open()
    for i, kind in enumerate(kinds):
        p = doc.new_page(width=A4.width, height=A4.height)
        if kind == "text":
            p.insert_text((72, 100), f"Content of page {i + 1}", fontsize=14)
        elif kind == "number":
            p.insert_text((A4.width / 2, A4.height - 40), str(i + 1), fontsize=9)
        elif kind == "watermark":
            p.insert_text((150, 400), "DRAFT", fontsize=60, color=(0.93, 0.93, 0.93))
        elif kind == "dark":
            p.draw_rect(p.rect, color=(0, 0, 0), fill=(0, 0, 0))
            p.insert_text((72, 100), f"Dark page {i + 1}", fontsize=14, color=(1, 1, 1))
        elif kind == "table":
            for r in range(4):
                for c in range(3):
                    rect = pymupdf.Rect(72 + c * 120, 150 + r * 24, 192 + c * 120, 174 + r * 24)
                    p.draw_rect(rect, color=(0, 0, 0), width=0.8)
                    p.insert_text((rect.x0 + 4, rect.y0 + 16), f"r{r}c{c}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path)
    return path


def encrypted_pdf(path: Path, password: str = "secret") -> Path:
    doc = pymupdf.open()
    p = doc.new_page()
    p.insert_text((72, 100), "Confidential content", fontsize=14)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw=password + "-owner")
    return path


def zero_page_pdf(path: Path) -> Path:
    """A syntactically valid PDF whose page tree is empty (PyMuPDF refuses to save one)."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_raw_pdf(objs))
    return path


def truncated_pdf(path: Path, source: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def damaged_xref_pdf(path: Path, source: Path) -> Path:
    """Same content with the xref offsets garbled: PyMuPDF repairs this on open."""
    data = bytearray(source.read_bytes())
    i = data.rfind(b"startxref")
    data[i + 10 : i + 14] = b"9999"
    path.write_bytes(bytes(data))
    return path


def huge_page_pdf(path: Path, inches: float = 200) -> Path:
    doc = pymupdf.open()
    p = doc.new_page(width=inches * 72, height=inches * 72)
    p.insert_text((72, 100), "A very large page", fontsize=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path)
    return path


def many_pages_pdf(path: Path, pages: int) -> Path:
    """``pages`` pages of one short line each; built by doubling (fast for thousands of pages)."""
    doc = pymupdf.open()
    for i in range(min(pages, 16)):
        p = doc.new_page(width=A4.width, height=A4.height)
        p.insert_text((72, 100), f"Page {i + 1} of a long document", fontsize=12)
    while doc.page_count < pages:
        src = pymupdf.open("pdf", doc.tobytes())
        doc.insert_pdf(src, to_page=min(src.page_count, pages - doc.page_count) - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path, garbage=1, deflate=True)
    return path


def _raw_pdf(objs: list[bytes], root: int = 1) -> bytes:
    out = bytearray(b"%PDF-1.5\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, root, xref)
    return bytes(out)


def _stream(dict_body: bytes, data: bytes) -> bytes:
    return b"<< " + dict_body + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


def cyclic_pages_pdf(path: Path) -> Path:
    """The page tree's Kids point back at the tree itself."""
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources 3 0 R >>",
    ]
    path.write_bytes(_raw_pdf(objs))
    return path


def nested_content_pdf(path: Path, depth: int = 200_000) -> Path:
    """A content stream of ``depth`` nested save/restore and an array nested ``depth`` deep."""
    content = b"q " * depth + b"BT /F1 12 Tf 72 700 Td (deep) Tj ET " + b"Q " * depth
    arr = b"[" * 50_000 + b"]" * 50_000
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Deep "
        + arr
        + b" >> >>",
        _stream(b"", content),
    ]
    path.write_bytes(_raw_pdf(objs))
    return path


def image_bomb_pdf(path: Path, width: int = 40_000, height: int = 25_000) -> Path:
    """An image whose Flate stream is small (~1 MB) but decompresses to width*height bytes (1 GB)."""
    import zlib

    comp = zlib.compressobj(9)
    chunk = bytes(1 << 22)
    total = width * height
    parts = []
    done = 0
    while done < total:
        n = min(len(chunk), total - done)
        parts.append(comp.compress(chunk[:n]))
        done += n
    parts.append(comp.flush())
    data = b"".join(parts)
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /XObject << /Im0 5 0 R >> >> >>",
        _stream(b"", b"q 595 0 0 842 0 0 cm /Im0 Do Q"),
        _stream(
            b"/Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray "
            b"/BitsPerComponent 8 /Filter /FlateDecode" % (width, height),
            data,
        ),
    ]
    path.write_bytes(_raw_pdf(objs))
    return path
