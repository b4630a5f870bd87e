"""Tests for postprocess.sanitize: hostile model output must come out inert in both modes.

Each attack goes through ``clean_page`` (clean and grounded, HTML and Markdown tables) and the
result is rendered with a CommonMark renderer with raw HTML *enabled*, the way a careless viewer
would show it; the rendered HTML must hold no script, handler, frame, style or unsafe URL.
"""

from __future__ import annotations

import pytest

from postprocess import CleanOptions, clean_page
from postprocess.audit import audit_markdown, rendered_html_problems
from postprocess.sanitize import escape_residual_html, sanitize_markdown, unsafe_url

ATTACKS = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    "<script>alert(1)",
    "<img src=x onerror=alert(1)>",
    "<img src=x onerror=alert(1)",
    '<img src="x>" onerror="alert(1)">',
    "<iframe src=javascript:alert(1)></iframe>",
    "<style>body{background:url(javascript:alert(1))}</style>",
    "<svg onload=alert(1)><circle r=1 /></svg>",
    "<svg><script>alert(1)</script></svg>",
    "<math><mi xlink:href=javascript:alert(1)>x</mi></math>",
    '<a href="javascript:alert(1)">click</a>',
    '<a href="jav&#x09;ascript:alert(1)">click</a>',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click](jav&#x61;script:alert(1))",
    "[click](javascript&colon;alert(1))",
    "[click](<javascript:alert(1)>)",
    "[click](javascript\\:alert(1))",
    "![img](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[ref]\n\n[ref]: javascript:alert(1)",
    "<javascript:alert(1)>",
    "<vbscript:msgbox(1)>",
    '<div onmouseover="alert(1)">hover</div>',
    "<body onload=alert(1)>",
    "<object data=javascript:alert(1)></object>",
    "<embed src=javascript:alert(1)>",
    "<form action=javascript:alert(1)><button>x</button></form>",
    '<meta http-equiv=refresh content="0;url=javascript:alert(1)">',
    "<link rel=stylesheet href=javascript:alert(1)>",
    "<base href=javascript:alert(1)//>",
    "<!--><script>alert(1)</script>-->",
    "<![CDATA[<script>alert(1)</script>]]>",
    "<scr<script>ipt>alert(1)</scr</script>ipt>",
    "<<script>script>alert(1)<</script>/script>",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "<table><tr><td onclick=alert(1)><script>alert(1)</script>x</td></tr></table>",
    "<table><tr><td>&lt;img src=x onerror=alert(1)&gt;</td></tr></table>",
    "<table><tr><td><a href=javascript:alert(1)>x</a></td></tr></table>",
    '<table><tr><td><style>*{}</style>y</td><td colspan="2" style="x">z</td></tr></table>',
    "<sup onclick=alert(1)>1</sup>",
    '<b style="background:url(javascript:alert(1))">b</b>',
    "<div\nonclick=alert(1)>x</div>",
    "<template><img src=x onerror=alert(1)></template>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>"></noscript>',
    "<x-custom onfocus=alert(1) autofocus>",
    "<select><option>x</option></select><textarea><script>alert(1)</script></textarea>",
]


def _wrap(attack: str) -> list[str]:
    return [
        attack,
        f"<|ref|>text<|/ref|><|det|>[[1, 2, 300, 40]]<|/det|>\nBefore {attack} after",
        f"<|ref|>table<|/ref|><|det|>[[1, 2, 300, 40]]<|/det|>\n<table><tr><td>{attack}</td></tr></table>",
        f"<|ref|>te{attack}xt<|/ref|><|det|>[[1, 2, 300, 40]]<|/det|>\nlabel attack",
    ]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(
    "options",
    [CleanOptions(), CleanOptions(mode="grounded"), CleanOptions(table_format="markdown")],
    ids=["clean", "grounded", "md-tables"],
)
def test_attack_is_inert(attack: str, options: CleanOptions) -> None:
    for raw in _wrap(attack):
        md = clean_page(raw, options=options).markdown
        assert audit_markdown(md, mode=options.mode) == [], md
        assert rendered_html_problems(md) == [], (raw, md)


def test_text_around_attacks_survives() -> None:
    md = clean_page("Before <script>alert(1)</script> after <b onclick=x>bold</b>").markdown
    assert md == "Before  after <b>bold</b>"
    md = clean_page("Use List<String> here").markdown
    assert md == "Use List&lt;String> here"
    md = clean_page("Maths \\( 0<i<n \\) ok").markdown
    assert md == "Maths \\( 0< i< n \\) ok"


def test_allowlist_kept() -> None:
    md = "H<sub>2</sub>O x<sup>2</sup> <i>it</i> <em>e</em> <strong>s</strong> <b>b</b> line<br/>break"
    out, _ = sanitize_markdown(md)
    assert (
        out == "H<sub>2</sub>O x<sup>2</sup> <i>it</i> <em>e</em> <strong>s</strong> <b>b</b> line<br>break"
    )


def test_safe_links_kept() -> None:
    for md in [
        "[a](https://example.org/x_(y))",
        "[a](mailto:x@example.org)",
        "[a](./rel/path.png)",
        "![f](doc_assets/p1.png)",
        "[a](#frag)",
        "<https://example.org>",
    ]:
        out, n = sanitize_markdown(md)
        assert n == 0 and out == md.strip("<>")


def test_unsafe_url() -> None:
    for url in [
        "javascript:x",
        " JAVASCRIPT:x",
        "java\tscript:x",
        "jav&#x61;script:x",
        "data:text/html,x",
        "vbscript:x",
        "&#106;avascript:x",
        "javascript&colon;x",
        "file:///etc/passwd",
        "java\\script:x",
    ]:
        assert unsafe_url(url), url
    for url in ["http://x", "https://x", "mailto:a@b", "rel/a:b", "./a:b", "#x", "?q=javascript:x"]:
        assert not unsafe_url(url), url


def test_safety_net() -> None:
    assert escape_residual_html("<td>ok</td> <tdx> <!-- figure -->") == (
        "<td>ok</td> &lt;tdx> <!-- figure -->",
        1,
    )
