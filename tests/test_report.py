"""Unit tests of the report stage (``runner.report``): HTML escaping and sanitizing, filters and
navigation hooks, thumbnails (budget, damaged and encrypted PDFs), region overlays, the dashboard.

The fixtures below are shared with ``test_report_browser.py``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.report import (
    ThumbPolicy,
    render_review_html,
    render_run_dashboard,
    render_thumbnails,
    sanitize_markdown,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"


# --------------------------------------------------------------------------------------------- #
# Fixtures: a generated PDF and page records covering every status
# --------------------------------------------------------------------------------------------- #
STATUSES = ["ok", "retried_ok", "ok", "failed", "ok", "fallback_text_layer", "large_ok", "ok", "blank", "ok"]


def make_pdf(path: Path, n_pages: int) -> Path:
    import pymupdf

    doc = pymupdf.open()
    for i in range(n_pages):
        page = doc.new_page()
        page.insert_text((72, 90), f"Section {i + 1}", fontsize=20)
        page.insert_textbox(pymupdf.Rect(72, 120, 540, 400), ("Body text of the page. " * 30), fontsize=10)
        page.draw_rect(pymupdf.Rect(72, 430, 540, 600), color=(0.2, 0.3, 0.8), fill=(0.85, 0.9, 1.0))
    doc.save(path)
    doc.close()
    return path


def page_records(n_pages: int, hostile: bool = False) -> list[dict[str, Any]]:
    recs = []
    for i in range(n_pages):
        status = STATUSES[i % len(STATUSES)]
        md = (
            f"# Section {i + 1}\n\nBody text with H<sub>2</sub>O and x<sup>2</sup>.\n\n"
            "<table><tr><td rowspan=2>a &lt; b</td><td>1</td></tr><tr><td>2</td></tr></table>\n"
        )
        if hostile:
            md += (
                '\n<script>window.__pwned = 1</script>\n\n<img src=x onerror="window.__pwned = 2">\n\n'
                '[click](javascript:window.__pwned=3) <a href="javascript:window.__pwned=4">link</a>\n'
            )
        recs.append(
            {
                "page": i + 1,
                "status": status,
                "engine": "fake",
                "seconds": 1.5,
                "render_seconds": 0.05,
                "prompt_tokens": 273,
                "output_tokens": 410 if status != "failed" else None,
                "finish_reason": "length" if status == "failed" else "stop",
                "stopped_by_eos": status != "failed",
                "attempts": [
                    {
                        "attempt": 0,
                        "temperature": 0.0,
                        "resolution": "gundam",
                        "finish_reason": "length",
                        "stopped_by_eos": False,
                        "output_tokens": 8192,
                        "seconds": 30.1,
                        "degenerate": "block repeated 120x",
                        "error": None,
                    }
                ]
                if status != "ok"
                else [],
                "error": "engine gave up after 3 attempts" if status == "failed" else None,
                "counters": {"tables": 1, "dropped_boxes": i % 3},
                "notes": [],
                "raw_text": "<|ref|>title<|/ref|>",
                "markdown": md if status != "blank" else "",
                "regions": [
                    {"label": "title", "box_pt": [70, 70, 260, 96], "text": f"Section {i + 1}"},
                    {"label": "text", "box_pt": [70, 115, 542, 400], "text": "Body"},
                    {"label": "image", "box_pt": [72, 430, 540, 600], "text": ""},
                ],
            }
        )
    return recs


def summary_fixture() -> dict[str, Any]:
    # 3 pages/s for 80 s, then 1.5 pages/s
    timeline = [[2.0 * t, 6.0 * t if t < 40 else 240 + 3.0 * (t - 40)] for t in range(80)]
    return {
        "started": "2026-11-23T03:00:00Z",
        "wall_seconds": 160.0,
        "engine": "vllm",
        "mode": "grounded",
        "pages_per_s": 2.9,
        "files": {"ok": 11, "failed": 1, "skipped": 2},
        "pages": {
            "ok": 400,
            "retried_ok": 12,
            "large_ok": 4,
            "fallback_text_layer": 3,
            "failed": 2,
            "blank": 9,
        },
        "loop_rate": 0.035,
        "retries": {"attempted": 20, "improved": 12, "large_pass": 6, "large_improved": 4},
        "counters": {"tables": 31, "dropped_boxes": 7, "loops_trimmed": 15},
        "timeline": timeline,
        "docs": [
            {
                "source": f"s3://bucket/in/doc{i:02d}.pdf",
                "output": f"doc{i:02d}",
                "status": "ok",
                "pages": 30 + i,
                "seconds": 10.0 + 3 * i,
                "error": None,
            }
            for i in range(12)
        ]
        + [
            {
                "source": "s3://bucket/in/broken.pdf",
                "output": "broken",
                "status": "failed",
                "pages": 0,
                "seconds": 0.2,
                "error": "FileDataError: cannot open <broken> file",
            }
        ],
        "shards": [
            {"shard": "0-of-2", "gpu": "0", "pages": 220, "pages_per_s": 1.5},
            {"shard": "1-of-2", "gpu": "1", "pages": 210, "pages_per_s": 1.4},
        ],
    }


def _thumb_widths(doc_html: str) -> dict[str, int]:
    """Page id -> pixel width of its embedded JPEG thumbnail."""
    import io

    from PIL import Image

    out = {}
    for pid, uri in re.findall(
        r'<section class="page[^"]*" id="(p\d+)".*?data-src="data:image/jpeg;base64,([^"]+)"', doc_html
    ):
        out[pid] = Image.open(io.BytesIO(base64.b64decode(uri))).size[0]
    return out


def _sections(doc_html: str) -> list[str]:
    return re.findall(r"<section class=\"page.*?</section>", doc_html, flags=re.S)


# --------------------------------------------------------------------------------------------- #
# Sanitizing model Markdown
# --------------------------------------------------------------------------------------------- #
def test_sanitize_removes_scripts_handlers_and_javascript_links() -> None:
    out = sanitize_markdown(
        "<script>alert('x')</script>\n\n<img src=x onerror=alert(1)>\n\n[click](javascript:alert(1)) "
        "<a href=\"JaVaScRiPt:alert(2)\">two</a> <iframe src='http://evil'></iframe><style>body{}</style>"
        '<svg onload=alert(3)></svg> <a href="data:text/html,x">d</a>'
    )
    low = out.lower()
    assert "<script" not in low and "alert('x')" not in low
    assert "<img" not in low and "onerror" not in low and "onload" not in low
    assert "<iframe" not in low and "<style" not in low and "<svg" not in low
    assert 'href="javascript' not in low and 'href="data:' not in low
    assert ">two</a>" in out and ">d</a>" in out  # the link text is kept, the href is gone


def test_sanitize_keeps_document_markup() -> None:
    out = sanitize_markdown(
        "# Title\n\nH<sub>2</sub>O and x<sup>2</sup>, *em* **strong** `code`\n\n- a\n- b\n\n"
        '<table><tr><td rowspan="2" colspan="3" style="color:red" onclick="x()">a &lt; b</td></tr>'
        "</table>\n\n"
        "[site](https://example.org/x?a=1&b=2)\n"
    )
    assert "<h1>Title</h1>" in out
    assert "<sub>2</sub>" in out and "<sup>2</sup>" in out
    assert "<em>em</em>" in out and "<strong>strong</strong>" in out and "<code>code</code>" in out
    assert "<li>a</li>" in out
    assert '<td rowspan="2" colspan="3">a &lt; b</td>' in out  # spans kept, style/handlers dropped
    assert 'href="https://example.org/x?a=1&amp;b=2"' in out and 'rel="noopener noreferrer nofollow"' in out


def test_sanitize_markdown_tables() -> None:
    out = sanitize_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<table>" in out and "<th>a</th>" in out and "<td>2</td>" in out


HOSTILE = [
    "<script>x()</script>",
    "<img src=x onerror=x()>",
    "[a](javascript:x())",
    "<a href='javascript:x()'>a</a>",
    "<body onload=x()>",
    "<div style='background:url(javascript:x())'>",
    "<object data=x>",
    "<embed src=x>",
    "<form action=x><input></form>",
    "<meta http-equiv=refresh content='0;url=x'>",
    "<base href=x>",
    "<link rel=stylesheet href=x>",
    "<math><mi xlink:href='javascript:x()'>m</mi></math>",
    "<!-- c -->",
    "\n\n",
    "| t |\n|---|\n| v |\n",
    "<table><tr><td>",
    "`<script>`",
    "    <script>code</script>",
    "text",
    "<scr<script>ipt>x()</script>",
    '<a href=" javascript:x()">s</a>',
    '<a href="&#106;avascript:x()">e</a>',
    '<a href="\tjavascript:x()">t</a>',
    '<a href="&#x20;javascript:x()">u</a>',
    '<a href="https://ok.example/">ok</a>',
    "[md](https://ok.example/md)",
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=8))
def test_sanitize_never_lets_executable_markup_through(parts: list[str]) -> None:
    out = sanitize_markdown("".join(parts)).lower()
    tags = set(re.findall(r"<([a-z0-9]+)", out))
    assert tags <= {"a", "p", "table", "tbody", "thead", "tr", "td", "th", "pre", "code", "div", "br"}
    # text is escaped, so every literal "<" starts a real tag: no tag may carry an event handler
    for tag in re.findall(r"<[a-z][^>]*>", out):
        assert not re.search(r"\son[a-z]+\s*=", tag), tag
        for href in re.findall(r'href="([^"]*)"', tag):
            assert html.unescape(href).strip().startswith(("http:", "https:", "mailto:")), href


# --------------------------------------------------------------------------------------------- #
# Review page
# --------------------------------------------------------------------------------------------- #
def test_review_escapes_every_model_and_input_string(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "d.pdf", 1)
    evil = '"><script>alert(1)</script>'
    rec = page_records(1)[0]
    rec.update(
        status="failed",
        error=evil,
        notes=[evil],
        raw_text=evil + "</pre>",
        engine=evil,
        finish_reason=evil,
        counters={evil: 1},
        attempts=[{"attempt": 0, "temperature": 0.0, "resolution": evil, "degenerate": evil}],
        regions=[{"label": evil, "box_pt": [10, 10, 50, 50], "text": evil}],
    )
    out = render_review_html(str(pdf), [rec], title=evil)
    assert out.count("<script") == 1  # only the report's own script
    assert "<script>alert(1)" not in out
    assert html.escape(evil) in out


def test_review_only_its_own_script_may_run(tmp_path: Path) -> None:
    out = render_review_html(str(make_pdf(tmp_path / "d.pdf", 1)), page_records(1), title="t")
    script = re.search(r"<script>(.*?)</script>", out, flags=re.S)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', out)
    assert csp is not None
    assert f"script-src 'sha256-{digest}'" in csp.group(1)
    assert "default-src 'none'" in csp.group(1) and "img-src data:" in csp.group(1)
    assert "unsafe-inline'; script" not in csp.group(1).replace("style-src 'unsafe-inline'; ", "")


def test_review_has_filters_flags_and_navigation_hooks(tmp_path: Path) -> None:
    n = 10
    recs = page_records(n)
    out = render_review_html(str(make_pdf(tmp_path / "d.pdf", n)), recs, title="d.pdf")
    flagged = [r["page"] for r in recs if r["status"] != "ok"]
    assert 'id="only-flagged"' in out and 'id="shown-count"' in out
    for status in set(STATUSES):
        n_status = STATUSES.count(status)
        assert f'data-status="{status}">{status} {n_status}</button>' in out
    sections = _sections(out)
    assert len(sections) == n
    assert [
        int(re.search(r'id="p(\d+)"', s).group(1)) for s in sections if 'data-flagged="1"' in s
    ] == flagged
    assert f"{n} pages, {len(flagged)} flagged" in out
    assert "".join(f'<a href="#p{p}">{p}</a>' for p in flagged) in out
    assert 'ev.key === "j" || ev.key === "n"' in out  # the keyboard handler is inlined


def test_review_shows_status_attempts_counters_and_markdown(tmp_path: Path) -> None:
    recs = page_records(4)
    out = render_review_html(str(make_pdf(tmp_path / "d.pdf", 4)), recs, title="d")
    failed = next(s for s in _sections(out) if 'data-status="failed"' in s)
    assert "engine gave up after 3 attempts" in failed
    assert '<table class="small attempts">' in failed and "<td>block repeated 120x</td>" in failed
    assert "<td>gundam</td>" in failed and "<td>8192</td>" in failed
    assert '<table class="small counters">' in failed and "<td>tables</td><td>1</td>" in failed
    assert "<b>finish</b> length" in failed
    assert '<td rowspan="2">a &lt; b</td>' in failed  # the Markdown table, rendered


def test_review_thumbnails_are_small_jpegs_with_region_overlay(tmp_path: Path) -> None:
    out = render_review_html(
        str(make_pdf(tmp_path / "d.pdf", 3)), page_records(3), title="d", thumb_width=300
    )
    widths = _thumb_widths(out)
    assert widths == {"p1": 300, "p2": 300, "p3": 300}
    assert out.count(' data-src="data:image/jpeg;base64,') == 3 and ' src="data:' not in out  # shown lazily
    first = _sections(out)[0]
    # the page in points (PyMuPDF's default, A4 rounded) is the viewBox, so boxes in points need no scaling
    assert '<svg viewBox="0 0 595.00 842.00"' in first
    assert first.count('<g class="region"') == 3
    assert '<rect x="70.0" y="70.0" width="190.0" height="26.0"' in first


def test_review_caps_raw_output_of_looping_pages(tmp_path: Path) -> None:
    rec = page_records(1)[0]
    rec["raw_text"] = "<|ref|>text<|/ref|>" + "loop " * 10_000
    out = render_review_html(str(make_pdf(tmp_path / "d.pdf", 1)), [rec], title="d")
    assert "raw model output (50019 chars)" in out
    assert "(44019 more chars in .pages.jsonl)" in out
    assert out.count("loop ") < 1300


def test_review_shows_grounding_heads_as_labels_not_raw_tags(tmp_path: Path) -> None:
    rec = page_records(1)[0]
    rec["markdown"] = (
        "<|ref|>title<|/ref|><|det|>[[10, 20, 300, 40]]<|/det|>\n# Results\n\n"
        "<|ref|>table<|/ref|><|det|>[[10, 50, 300, 90]]<|/det|>\n<table><tr><td>1</td></tr></table>\n\n"
        "<|ref|><b>x</b><|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<script>bad()</script>tail\n"
    )
    out = render_review_html(str(make_pdf(tmp_path / "d.pdf", 1)), [rec], title="d")
    md = out.split('<div class="md">')[1]
    assert "&lt;|ref|&gt;" not in md and "<|ref|>" not in md
    assert '<div class="gl"><span>title</span> [[10, 20, 300, 40]]</div><h1>Results</h1>' in md
    assert '<div class="gl"><span>table</span> [[10, 50, 300, 90]]</div><table>' in md
    assert "<span>&lt;b&gt;x&lt;/b&gt;</span>" in md and "bad()" not in md and "tail" in md


def test_review_region_boxes_flat_nested_and_malformed(tmp_path: Path) -> None:
    rec = page_records(1)[0]
    rec["regions"] = [
        {"label": "table", "box_pt": [[10, 20, 110, 60], [10, 70, 110, 90]], "text": "t"},  # several boxes
        {"label": "text", "box_pt": [200, 300, 100, 250], "text": "swapped corners"},
        {"label": "bad", "box_pt": [1, 2, 3]},
        {"label": "bad", "box_pt": ["a", 2, 3, 4]},
        {"label": "bad", "box_pt": [float("nan"), 2, 3, 4]},
        {"label": "bad"},
        "not a dict",
    ]
    out = render_review_html(str(make_pdf(tmp_path / "d.pdf", 1)), [rec], title="d")
    assert out.count('<g class="region"') == 2
    assert '<rect x="10.0" y="70.0" width="100.0" height="20.0"' in out
    assert '<rect x="100.0" y="250.0" width="100.0" height="50.0"' in out
    assert 'data-label="bad"' not in out


def test_review_budget_shrinks_ok_pages_before_flagged_ones(tmp_path: Path) -> None:
    n = 40
    recs = page_records(n)
    pdf = make_pdf(tmp_path / "d.pdf", n)
    policy = ThumbPolicy(thumb_width=400, min_width=96, budget_bytes=200_000)
    out = render_review_html(str(pdf), recs, title="d", policy=policy)
    widths = _thumb_widths(out)
    ok_w = {widths[f"p{r['page']}"] for r in recs if r["status"] == "ok"}
    flag_w = {widths[f"p{r['page']}"] for r in recs if r["status"] not in ("ok",)}
    assert len(ok_w) == 1 and len(flag_w) == 1
    assert 96 <= ok_w.pop() < flag_w.pop() <= 400
    thumbs = sum(len(u) for u in re.findall(r'data-src="([^"]+)"', out))
    assert thumbs <= policy.budget_bytes * 1.3


def test_review_budget_below_min_width_lowers_quality(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "d.pdf", 12)
    recs = page_records(12)
    tiny = ThumbPolicy(thumb_width=400, min_width=96, min_quality=15, budget_bytes=1)
    at_min = ThumbPolicy(thumb_width=96, min_width=96, budget_bytes=10**9)
    squeezed = render_thumbnails(str(pdf), recs, tiny)
    plain = render_thumbnails(str(pdf), recs, at_min)
    size = sum(len(t.data_uri or "") for t in squeezed.values())
    assert set(_thumb_widths(render_review_html(str(pdf), recs, title="d", policy=tiny)).values()) == {96}
    assert size < 0.8 * sum(len(t.data_uri or "") for t in plain.values())


def test_review_with_plenty_of_budget_keeps_full_width(tmp_path: Path) -> None:
    out = render_review_html(
        str(make_pdf(tmp_path / "d.pdf", 10)), page_records(10), title="d", thumb_width=200
    )
    assert set(_thumb_widths(out).values()) == {200}


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "cannot open PDF"),
        (b"%PDF-1.7\nthis is not a pdf", "cannot open PDF"),
        (b"", "cannot open PDF"),
    ],
)
def test_review_of_missing_or_damaged_pdf_has_no_thumbnails(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "x.pdf"
    if content is not None:
        path.write_bytes(content)
    out = render_review_html(str(path), page_records(3), title="x")
    assert out.count('class="thumb nothumb"') == 3 and reason in out
    assert out.count('<div class="md">') == 3  # the pages are all still there


def test_review_skips_pages_the_renderer_choked_on_and_pages_beyond_the_pdf(tmp_path: Path) -> None:
    recs = page_records(3)
    recs[0]["status"] = "render_timeout"
    recs[1]["status"] = "render_error"
    recs[2]["page"] = 7
    out = render_review_html(str(make_pdf(tmp_path / "d.pdf", 2)), recs, title="d")
    assert "not re-rendered (render_timeout)" in out and "not re-rendered (render_error)" in out
    assert "page 7 is not in the PDF (2 pages)" in out
    assert "data-src=" not in out


def test_review_of_encrypted_pdf_uses_the_password() -> None:
    pdf = CORPUS / "malformed" / "pypdf-sample-005-libreoffice-writer-password.pdf"
    if not pdf.exists():
        pytest.skip(f"{pdf} not present (the licensed corpus lives beside the repository)")
    recs = page_records(1)
    locked = render_review_html(str(pdf), recs, title="enc")
    assert "password was not accepted" in locked and "data-src=" not in locked
    opened = render_review_html(str(pdf), recs, title="enc", password="openpassword")
    assert "data-src=" in opened


def test_review_tolerates_sparse_records(tmp_path: Path) -> None:
    out = render_review_html(
        str(make_pdf(tmp_path / "d.pdf", 2)), [{"page": 2, "status": "failed"}, {"page": 1}], title="d"
    )
    sections = _sections(out)
    assert [re.search(r'id="(p\d+)"', s).group(1) for s in sections] == ["p1", "p2"]  # sorted by page
    assert "(no Markdown)" in out and 'data-status="unknown"' in out
    odd = render_review_html(str(tmp_path / "missing.pdf"), [{"page": None}, {}, {"page": "x"}], title="o")
    assert len(_sections(odd)) == 3 and odd.count('class="thumb nothumb"') == 3


def test_importing_report_loads_nothing_heavy() -> None:
    code = (
        "import sys, runner.report; "
        "print(sorted(m for m in ('pymupdf', 'fitz', 'markdown_it', 'nh3', 'PIL', 'numpy', 'torch') "
        "if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_thumb_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        ThumbPolicy(thumb_width=100, min_width=200)
    with pytest.raises(ValueError):
        ThumbPolicy(jpeg_quality=0)
    with pytest.raises(ValueError):
        ThumbPolicy(jpeg_quality=30, min_quality=40)
    with pytest.raises(ValueError):
        ThumbPolicy(flagged_share=1.5)


def test_render_thumbnails_keys_by_page_number(tmp_path: Path) -> None:
    thumbs = render_thumbnails(str(make_pdf(tmp_path / "d.pdf", 2)), page_records(2), ThumbPolicy())
    assert sorted(thumbs) == [1, 2]
    assert all(t.data_uri and t.data_uri.startswith("data:image/jpeg;base64,/9j/") for t in thumbs.values())
    assert (thumbs[1].width_pt, thumbs[1].height_pt) == (595.0, 842.0)


@pytest.mark.slow
def test_review_of_1000_page_document_stays_small(tmp_path: Path) -> None:
    n = 1000
    recs = page_records(n)
    for i, rec in enumerate(recs):  # 5% of the pages flagged, as in a real run
        rec["status"] = "ok" if i % 20 else "retried_ok"
    out = render_review_html(str(make_pdf(tmp_path / "big.pdf", n)), recs, title="big")
    size = len(out.encode())
    thumbs = sum(len(u) for u in re.findall(r'data-src="([^"]+)"', out))
    print(f"1000-page review: {size / 1e6:.2f} MB, thumbnails {thumbs / 1e6:.2f} MB")
    assert len(_sections(out)) == n
    assert thumbs <= ThumbPolicy().budget_bytes * 1.3
    assert size < 7_000_000
    widths = _thumb_widths(out)
    assert widths["p1"] == 400 and widths["p2"] < 400  # page 1 is flagged in the fixture, page 2 ok


def test_cli_report_writes_review_and_dashboard(tmp_path: Path, run_fake: Any) -> None:
    """--report through the real CLI (fake engine, grounded): one review per PDF and ``_run.html``,
    built from the pipeline's own records (nested ``box_pt`` lists, a retried page)."""
    src = tmp_path / "in"
    src.mkdir()
    make_pdf(src / "a.pdf", 3)
    code, out, _ = run_fake(src, "--mode", "grounded", "--report", loop_pages={("a.pdf", 1): 1}, hostile=True)
    assert code == 0
    review = (out / "a.review.html").read_text(encoding="utf-8")
    assert len(_sections(review)) == 3
    assert 'id="p2" data-status="retried_ok" data-flagged="1"' in review
    assert review.count('<g class="region"') >= 3 and review.count("data-src=") == 3
    assert review.count("<script") == 1 and "<iframe" not in review and "<img src=x" not in review
    for tag in re.findall(r"<[a-z][^>]*>", review):
        assert not re.search(r"\son[a-z]+\s*=|javascript:", tag), tag
    dash = (out / "_run.html").read_text(encoding="utf-8")
    assert 'id="c-status"' in dash and "retried_ok" in dash
    links = re.findall(r'<a href="([^"]+\.review\.html)">', dash)
    assert links and all((out / link).is_file() for link in links)


# --------------------------------------------------------------------------------------------- #
# Dashboard
# --------------------------------------------------------------------------------------------- #
def test_dashboard_sections_and_numbers() -> None:
    out = render_run_dashboard(summary_fixture())
    for cid in ("c-done", "c-rate", "c-status", "c-retries", "c-slow", "c-shards", "c-failed", "c-counters"):
        assert f'id="{cid}"' in out
    assert "<script" not in out  # plots are plain inline SVG
    assert "default-src 'none'" in out
    assert ">430<" in out  # pages tile: the sum of the status counts
    assert "3.5%" in out  # loop rate
    assert "retry success 60.0%" in out and "large success 66.7%" in out
    assert "run mean 2.90" in out  # the dashed mean line on the throughput plot
    assert ">0-of-2 (GPU 0), 220 p<" in out and ">1.50 p/s<" in out
    assert "FileDataError: cannot open &lt;broken&gt; file" in out


def test_dashboard_slowest_documents_sorted_and_capped() -> None:
    summary = summary_fixture()
    summary["docs"] = [
        {"source": f"d{i}.pdf", "status": "ok", "pages": 1, "seconds": float(i)} for i in range(40)
    ]
    out = render_run_dashboard(summary)
    slow = out.split('id="c-slow"')[1].split("</section>")[0]
    names = re.findall(r"<td>(d\d+\.pdf)</td>", slow)
    assert names == [f"d{i}.pdf" for i in range(39, 24, -1)]


def test_dashboard_links_documents_to_their_review_pages() -> None:
    summary = summary_fixture()
    summary["docs"] = [
        {"source": "s3://b/in/a b.pdf", "output": "sub/a b", "status": "ok", "pages": 3, "seconds": 9.0},
        {"source": "bad.pdf", "output": "bad", "status": "failed", "pages": 0, "seconds": 8.0, "error": "x"},
        {"source": "evil.pdf", "output": "../../etc/x", "status": "ok", "pages": 1, "seconds": 7.0},
        {"source": "abs.pdf", "output": "/tmp/x", "status": "ok", "pages": 1, "seconds": 6.0},
    ]
    slow = render_run_dashboard(summary).split('id="c-slow"')[1].split("</section>")[0]
    assert '<td><a href="sub/a%20b.review.html">s3://b/in/a b.pdf</a></td>' in slow
    assert "<td>bad.pdf</td>" in slow  # never opened: no review page to link to
    assert "<td>evil.pdf</td>" in slow and "<td>abs.pdf</td>" in slow


def test_dashboard_escapes_sources_and_labels() -> None:
    summary = summary_fixture()
    summary["docs"][0]["source"] = "<img src=x onerror=alert(1)>.pdf"
    summary["counters"] = {"<b>c</b>": 2}
    summary["pages"] = {"<script>s</script>": 1}
    summary["shards"] = [{"shard": "<i>0</i>", "gpu": "\"'", "pages": 1, "pages_per_s": 1.0}]
    out = render_run_dashboard(summary)
    assert "<img" not in out and "<script" not in out and "<b>c" not in out and "<i>0" not in out


def test_dashboard_of_empty_or_partial_summary() -> None:
    out = render_run_dashboard({})
    assert out.count('<p class="empty">') >= 5 and "OCR run dashboard" in out
    out = render_run_dashboard(
        {"timeline": [[0, 0], ["x", 1], None, [float("nan"), 2]], "pages": {"ok": "n/a"}}
    )
    assert "not enough points to plot" in out


def test_dashboard_timeline_is_downsampled_and_rate_is_right() -> None:
    summary = summary_fixture()
    summary["timeline"] = [[t / 10, t * 0.5] for t in range(20_001)]  # 5 pages/s for 2,000 s
    summary["shards"] = []
    out = render_run_dashboard(summary)
    assert len(out) < 100_000
    done = re.search(r'id="c-done".*?<polyline points="([^"]+)"', out, flags=re.S)
    assert done is not None and len(done.group(1).split()) <= 401
    rate = re.search(r'id="c-rate".*?<polyline points="([^"]+)"', out, flags=re.S)
    assert rate is not None
    ys = {p.split(",")[1] for p in rate.group(1).split()}
    assert len(ys) == 1  # a constant rate is a flat line
    # read the line's value back from two labelled grid lines of the y axis
    card = out.split('id="c-rate"')[1].split("</section>")[0]
    ticks = {
        float(v): float(y)
        for y, v in re.findall(r'<text x="48" y="([\d.]+)" text-anchor="end">([\d.]+)<', card)
    }
    (v0, y0), (v1, y1) = sorted(ticks.items())[:2]
    line_y = float(ys.pop()) + 4  # tick labels sit 4 px below their grid line
    assert v0 + (line_y - y0) * (v1 - v0) / (y1 - y0) == pytest.approx(5.0, abs=0.05)


def test_dashboard_pages_done_never_goes_down() -> None:
    summary = summary_fixture()
    summary["timeline"] = [[0, 0], [1, 10], [2, 4], [3, 12], [2.5, 11]]  # a dip and an out-of-order point
    out = render_run_dashboard(summary)
    done = re.search(r'id="c-done".*?<polyline points="([^"]+)"', out, flags=re.S)
    assert done is not None
    ys = [float(p.split(",")[1]) for p in done.group(1).split()]  # SVG y grows downwards
    assert len(ys) == 5 and ys == sorted(ys, reverse=True)
