"""Browser tests of the report stage: the review page and the dashboard in a real headless chromium.

The page is loaded from a file:// URL through the Chrome DevTools Protocol (websocket-client);
the test fails on any console error, exception or CSP violation, queries the DOM, drives the
keyboard navigation and checks the screenshot's pixels. Skips when chromium or websocket-client
is missing (CI: ``apt-get install -y chromium``).

Run as a script to (re)make the screenshots of the bundled samples kept in
``tmp_pdf_runs/report_screenshots/``::

    .venv/bin/python tests/test_report_browser.py [--out tmp_pdf_runs/report_screenshots] [PDF ...]
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode
    sys.path.insert(0, str(ROOT))

from test_report import make_pdf, page_records, summary_fixture  # noqa: E402

from runner.report import render_review_html, render_run_dashboard  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)


class Browser:
    """A headless chromium with one page, driven over CDP. Collects console errors as they come."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        import websocket

        assert CHROMIUM is not None
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                *CHROME_FLAGS,
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while time.monotonic() < deadline:
            self.ws.settimeout(max(deadline - time.monotonic(), 0.01))
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)

    def open(self, path: Path) -> None:
        self.events.clear()
        self.send("Page.navigate", {"url": path.resolve().as_uri()})
        self.wait_event("Page.loadEventFired")
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def eval(self, expression: str) -> Any:
        res = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def key(self, key: str) -> None:
        for kind in ("keyDown", "keyUp"):
            params = {"type": kind, "key": key, "code": f"Key{key.upper()}"}
            if kind == "keyDown":
                params["text"] = key
            self.send("Input.dispatchKeyEvent", params)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (CSP, failed loads) so far."""
        self.eval("1")  # flush pending events
        out = []
        for ev in self.events:
            method, params = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(
                    "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append("log: " + params["entry"].get("text", ""))
        return out

    def screenshot(self, dest: Path, full_page: bool = False) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": min(size[1], 8000), "scale": 1}
        data = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return data

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self._profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    pytest.importorskip("websocket", reason="websocket-client not installed")
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def _pixels(png: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _count_colour(img: Any, rgb: tuple[int, int, int], tol: int = 12) -> int:
    import numpy as np

    diff = np.abs(np.asarray(img, dtype=np.int16) - np.array(rgb, dtype=np.int16))
    return int((diff.max(axis=2) <= tol).sum())


# --------------------------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------------------------- #
def test_review_page_in_browser(browser: Browser, tmp_path: Path) -> None:
    n = 10
    pdf = make_pdf(tmp_path / "doc.pdf", n)
    recs = page_records(n, hostile=True)
    out = tmp_path / "doc.review.html"
    out.write_text(render_review_html(str(pdf), recs, title="doc.pdf"), encoding="utf-8")
    browser.open(out)
    assert browser.errors() == []

    flagged = [f"p{r['page']}" for r in recs if r["status"] != "ok"]
    assert browser.eval("document.querySelectorAll('section.page').length") == n
    assert (
        browser.eval("[...document.querySelectorAll('section.page[data-flagged=\"1\"]')].map(s => s.id)")
        == flagged
    )
    # hostile Markdown did not run and left no executable markup behind
    assert browser.eval("window.__pwned") is None
    assert browser.eval("document.scripts.length") == 1
    assert browser.eval("document.querySelectorAll('[onerror], img:not(.thumb img)').length") == 0
    assert (
        browser.eval(
            "[...document.querySelectorAll('a[href]')].filter(a => !a.href.startsWith('file:')"
            " && !a.href.startsWith('http')).length"
        )
        == 0
    )
    # the Markdown table with its rowspan and the sub/sup survived
    assert browser.eval("document.querySelector('#p1 .md td[rowspan=\"2\"]').textContent") == "a < b"
    assert browser.eval("document.querySelector('#p1 .md sub').textContent") == "2"
    # region boxes are drawn over the thumbnail, labelled
    assert browser.eval("document.querySelectorAll('#p1 .thumb svg g.region').length") == 3
    assert browser.eval("document.querySelector('#p1 .thumb svg text').textContent") == "title"
    # the first thumbnail in view was loaded (lazily, from its data: URI) and decoded
    browser.eval("new Promise(r => setTimeout(r, 300))")
    assert (
        browser.eval(
            "(() => { const i = document.querySelector('#p1 .thumb img');"
            " return i.complete && i.naturalWidth > 0; })()"
        )
        is True
    )
    assert browser.eval("document.querySelector('#p10 .thumb img').hasAttribute('src')") is False

    png = browser.screenshot(tmp_path / "review.png")
    img = _pixels(png)
    assert img.size == (1400, 1000)
    assert _count_colour(img, (0x2E, 0x7D, 0x32)) > 500  # the green border/badge of the ok page 1

    # keyboard: j/n forward over flagged pages, k/p back
    browser.key("j")
    assert browser.eval("document.querySelector('section.current').id") == flagged[0]
    browser.key("n")
    assert browser.eval("document.querySelector('section.current').id") == flagged[1]
    browser.key("k")
    assert browser.eval("document.querySelector('section.current').id") == flagged[0]
    png = browser.screenshot(tmp_path / "review_flagged.png")
    assert _count_colour(_pixels(png), (0x1F, 0x6F, 0xEB), tol=20) > 300  # the blue "current" ring

    # filter: only the pages that are not ok stay visible
    browser.eval("document.getElementById('only-flagged').click()")
    visible = browser.eval(
        "[...document.querySelectorAll('section.page')].filter(s => !s.hidden).map(s => s.id)"
    )
    assert visible == flagged
    assert browser.eval("document.getElementById('shown-count').textContent") == str(len(flagged))
    browser.eval("document.querySelector('.chip[data-status=\"failed\"]').click()")
    assert browser.eval("[...document.querySelectorAll('section.page')].filter(s => !s.hidden).length") == 1
    assert browser.errors() == []


def test_long_review_loads_thumbnails_lazily(browser: Browser, tmp_path: Path) -> None:
    n = 300
    out = tmp_path / "long.review.html"
    out.write_text(render_review_html(str(make_pdf(tmp_path / "long.pdf", n)), page_records(n), title="long"))
    browser.open(out)
    assert browser.errors() == []
    assert browser.eval("document.querySelectorAll('section.page').length") == n
    loaded = browser.eval("document.querySelectorAll('.thumb img[src]').length")
    assert 1 <= loaded <= 20  # only the pages near the viewport decoded their image
    browser.eval("window.scrollTo(0, document.body.scrollHeight)")
    browser.eval("new Promise(r => setTimeout(r, 300))")
    assert browser.eval(f"document.querySelector('#p{n} .thumb img').hasAttribute('src')") is True
    assert browser.eval("document.querySelectorAll('.thumb img[src]').length") <= 2 * loaded + 20
    # 'f' toggles the flagged-only filter from the keyboard
    browser.key("f")
    shown = browser.eval("[...document.querySelectorAll('section.page')].filter(s => !s.hidden).length")
    assert shown == sum(1 for r in page_records(n) if r["status"] != "ok")
    assert browser.errors() == []


def test_review_of_unreadable_pdf_in_browser(browser: Browser, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.7 garbage")
    out = tmp_path / "bad.review.html"
    out.write_text(render_review_html(str(bad), page_records(2), title="bad.pdf"), encoding="utf-8")
    browser.open(out)
    assert browser.errors() == []
    assert browser.eval("document.querySelectorAll('.thumb.nothumb').length") == 2
    assert "cannot open PDF" in browser.eval("document.querySelector('.thumb.nothumb').textContent")


def test_dashboard_in_browser(browser: Browser, tmp_path: Path) -> None:
    out = tmp_path / "_run.html"
    out.write_text(render_run_dashboard(summary_fixture()), encoding="utf-8")
    browser.open(out)
    assert browser.errors() == []
    ids = browser.eval("[...document.querySelectorAll('section.card')].map(c => c.id)")
    assert ids == [
        "c-done",
        "c-rate",
        "c-status",
        "c-retries",
        "c-slow",
        "c-shards",
        "c-failed",
        "c-counters",
    ]
    assert browser.eval("document.querySelectorAll('#c-done polyline, #c-rate polyline').length") == 2
    assert browser.eval("document.querySelectorAll('#c-status g.bar').length") == 6
    assert browser.eval("document.querySelectorAll('#c-shards g.bar').length") == 2
    assert "broken.pdf" in browser.eval("document.querySelector('#c-failed').textContent")
    # the polyline really spans the plot (it is not collapsed to a point)
    width = browser.eval("document.querySelector('#c-done polyline').getBBox().width")
    assert width > 300
    png = browser.screenshot(tmp_path / "dashboard.png", full_page=True)
    img = _pixels(png)
    assert _count_colour(img, (0x1F, 0x6F, 0xEB), tol=40) > 300  # the blue "pages done" line


# --------------------------------------------------------------------------------------------- #
# Script mode: screenshots of the bundled samples
# --------------------------------------------------------------------------------------------- #
def fake_run(pdfs: list[Path], out_dir: Path) -> None:
    """Run the real CLI (grounded, --report) with the fake engine over ``pdfs``: every page gets the
    pipeline's own records; the second page of each document loops once (so it is retried) and the
    output carries hostile HTML (so the review shows what survives sanitizing)."""
    from fakes import FakeFactory

    import runner.engines as engines
    from runner.cli import main as cli_main

    in_dir = out_dir / "_in"
    in_dir.mkdir(parents=True, exist_ok=True)
    for pdf in pdfs:
        shutil.copy(pdf, in_dir / pdf.name)
    loops = {(pdf.name, 1): 1 for pdf in pdfs}
    engines.create_engine = FakeFactory(loop_pages=loops, hostile=True)  # type: ignore[assignment]
    cli_main(
        [
            "--input-dir",
            str(in_dir),
            "--output-dir",
            str(out_dir / "out"),
            "--mode",
            "grounded",
            "--report",
            "--progress",
            "none",
        ]
    )


def screenshot_run(browser: Browser, run_dir: Path, shots: Path) -> None:
    """Screenshots of every review page and the dashboard of one run's output folder."""
    for page in sorted(run_dir.rglob("*.review.html")):
        stem = page.name.removesuffix(".review.html")
        browser.open(page)
        browser.screenshot(shots / f"{stem}.review.png")
        if browser.eval("document.querySelectorAll('section.page[data-flagged=\"1\"]').length"):
            browser.key("j")
            browser.eval("new Promise(r => setTimeout(r, 200))")
            browser.screenshot(shots / f"{stem}.review.flagged.png")
        print(f"{page.name}: {page.stat().st_size} bytes;", browser.errors() or "no console errors")
    for dash in sorted(run_dir.rglob("_run*.html")):
        browser.open(dash)
        browser.screenshot(shots / f"{dash.stem}.dashboard.png", full_page=True)
        print(f"{dash.name}: {dash.stat().st_size} bytes;", browser.errors() or "no console errors")


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pdfs", nargs="*", type=Path, help="default: samples/*.pdf")
    ap.add_argument("--out", type=Path, default=ROOT / "tmp_pdf_runs" / "report_screenshots")
    ap.add_argument("--run-dir", type=Path, help="screenshot the reports of an existing run instead")
    args = ap.parse_args(argv)
    if CHROMIUM is None:
        print("chromium not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir
        if run_dir is None:
            fake_run(args.pdfs or sorted((ROOT / "samples").glob("*.pdf")), Path(tmp))
            run_dir = Path(tmp) / "out"
        browser = Browser()
        try:
            screenshot_run(browser, run_dir, args.out)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
