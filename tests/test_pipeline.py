"""CPU pipeline runs against the fake engine and generated PDFs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pdfgen
import pytest
from conftest import REPO


def _pages(out: Path, stem: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{stem}.pages.jsonl").read_text().splitlines()]


def test_end_to_end_outputs(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=3)
    pdfgen.pdf_with_pages(src / "sub" / "b.pdf", ["text", "blank", "text"])
    code, out, factory = run_fake(src)
    assert code == 0
    md = (out / "a.md").read_text()
    assert "Page 1 heading" in md and "Page 3 heading" in md
    assert md.index("Page 1 heading") < md.index("----- Page 2 -----") < md.index("Page 2 heading")
    assert "----- Page 1 -----" not in md
    assert "<|ref|>" not in md and "<｜" not in md
    recs = _pages(out, "a")
    assert [r["page"] for r in recs] == [1, 2, 3]
    assert all(r["status"] == "ok" and r["finish_reason"] == "stop" and r["stopped_by_eos"] for r in recs)
    assert all("Page" in r["raw_text"] for r in recs)
    b = _pages(out, "sub/b")
    assert [r["status"] for r in b] == ["ok", "blank", "ok"]
    assert "[[Blank page]]" in (out / "sub" / "b.md").read_text()
    # the blank page never reached the engine
    seen = {(r.doc, r.page_index) for r in factory.engines[-1].seen}
    assert ("b.pdf", 1) not in seen and ("b.pdf", 0) in seen
    assert json.loads((out / "a.done").read_text())["status"] == "ok"
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["files"] == {"ok": 2, "failed": 0, "skipped": 0}
    assert summary["pages"] == {"ok": 5, "blank": 1}
    assert not list(out.rglob("*.tmp-*"))


def test_rerun_skips_done_and_force_redoes(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    code, out, _ = run_fake(src)
    assert code == 0
    before = (out / "a.md").read_bytes()
    code, out, factory = run_fake(src)
    assert code == 0 and factory.engines[-1].started == 0  # nothing to do: no model was loaded
    assert json.loads((out / "_run_summary.json").read_text())["files"]["skipped"] == 1
    code, out, factory = run_fake(src, "--force")
    assert code == 0 and len(factory.engines[-1].seen) == 2
    assert (out / "a.md").read_bytes() == before


def test_same_stem_in_two_folders_never_collides(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "x" / "doc.pdf", pages=1, prefix="Alpha")
    pdfgen.text_pdf(src / "y" / "doc.pdf", pages=1, prefix="Beta")
    code, out, _ = run_fake(src)
    assert code == 0
    assert "Alpha" in (out / "x" / "doc.md").read_text()
    assert "Beta" in (out / "y" / "doc.md").read_text()


def test_max_pages_and_input_list(tmp_path, run_fake, monkeypatch):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "long.pdf", pages=5)
    lst = tmp_path / "list.txt"
    lst.write_text("# one file\nin/long.pdf\n\n")
    from fakes import FakeFactory

    import runner.engines as engines
    from runner.cli import main

    monkeypatch.setattr(engines, "create_engine", FakeFactory())
    out = tmp_path / "o2"
    code = main(
        [
            "--input-list",
            str(lst),
            "--output-dir",
            str(out),
            "--max-pages",
            "2",
            "--progress",
            "none",
            "--log-file",
            str(tmp_path / "l.log"),
        ]
    )
    assert code == 0
    assert [r["page"] for r in _pages(out, "long")] == [1, 2]


def test_bad_inputs_are_per_file_errors(tmp_path, run_fake):
    src = tmp_path / "in"
    good = pdfgen.text_pdf(src / "good.pdf", pages=2)
    (src / "not_a_pdf.pdf").write_bytes(b"hello, I am plain text\n" * 10)
    (src / "empty.pdf").write_bytes(b"")
    pdfgen.truncated_pdf(src / "truncated.pdf", good, keep=0.1)
    pdfgen.damaged_xref_pdf(src / "badxref.pdf", good)
    pdfgen.zero_page_pdf(src / "zero.pdf")
    pdfgen.encrypted_pdf(src / "locked.pdf", "secret")
    code, out, _ = run_fake(src)
    assert code == 1  # some files failed
    summary = json.loads((out / "_run_summary.json").read_text())
    by = {Path(d["source"]).name: d for d in summary["docs"]}
    assert by["good.pdf"]["status"] == "ok"
    assert by["badxref.pdf"]["status"] == "ok"  # recovered, not rejected
    assert "Page 1 heading" in (out / "badxref.md").read_text()
    for name in ("not_a_pdf.pdf", "empty.pdf", "truncated.pdf", "zero.pdf", "locked.pdf"):
        assert by[name]["status"] == "failed", name
        assert by[name]["error"], name
        assert not (out / (Path(name).stem + ".done")).exists()
    assert "zero pages" in by["zero.pdf"]["error"]
    assert "[[Document not converted: cannot open PDF" in (out / "not_a_pdf.md").read_text()
    assert "password" in by["locked.pdf"]["error"]
    log_text = (tmp_path / "run.log").read_text()
    assert "locked.pdf" in log_text and "secret" not in log_text


def test_encrypted_with_password(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.encrypted_pdf(src / "locked.pdf", "s3cr3t-pw")
    code, out, _ = run_fake(src, "--password", "s3cr3t-pw")
    assert code == 0
    assert "Confidential content" in (out / "locked.md").read_text()
    for f in [*out.iterdir(), tmp_path / "run.log"]:
        if f.is_file():
            assert "s3cr3t-pw" not in f.read_text(errors="replace"), f


def test_render_timeout_is_a_page_status(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.pdf_with_pages(src / "a.pdf", ["text", "dark", "text"])
    # a worker hook that hangs on the dark page stands in for a page that takes forever to render
    code, out, _ = run_fake(
        src,
        "--render-timeout",
        "3",
        "--max-page-error-rate",
        "0.5",
        worker_hook=("slow_hook:hang_if_dark", {}),
    )
    assert code == 0
    recs = _pages(out, "a")
    assert [r["status"] for r in recs] == ["ok", "render_timeout", "ok"]
    assert "timed out" in recs[1]["error"]
    assert "[[Page not rendered: render_timeout]]" in (out / "a.md").read_text()


def test_page_error_budget_fails_document(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.pdf_with_pages(src / "a.pdf", ["text", "dark"])
    code, out, _ = run_fake(src, "--render-timeout", "3", worker_hook=("slow_hook:hang_if_dark", {}))
    assert code == 1
    assert (out / "a.md").exists()  # what was read is kept
    assert not (out / "a.done").exists()  # but the document is not done: a rerun retries it


def _snapshot(out: Path) -> dict[str, bytes]:
    snap = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and not f.name.startswith("_run_summary"):
            data = f.read_bytes()
            if f.suffix == ".jsonl":  # timings differ between runs; compare everything else
                recs = [json.loads(x) for x in data.decode().splitlines()]
                for r in recs:
                    r.pop("seconds", None)
                    r.pop("render_seconds", None)
                    for a in r.get("attempts", []):
                        a.pop("seconds", None)
                    r["notes"] = [n for n in r.get("notes", []) if not n.startswith("ink")]
                data = json.dumps(recs, sort_keys=True).encode()
            if f.suffix == ".done":
                d = json.loads(data)
                d.pop("finished")
                data = json.dumps(d, sort_keys=True).encode()
            snap[str(f.relative_to(out))] = data
    return snap


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_outputs(tmp_path):
    src = tmp_path / "in"
    for i in range(6):
        pdfgen.text_pdf(src / f"doc{i}.pdf", pages=4, prefix=f"D{i}")
    script = str(REPO / "tests" / "run_fake_cli.py")
    ref = tmp_path / "ref"
    args = ["--input-dir", str(src), "--progress", "none", "--render-workers", "2", "--batch-pages", "4"]
    subprocess.run(
        [
            sys.executable,
            script,
            "0",
            *args,
            "--output-dir",
            str(ref),
            "--log-file",
            str(tmp_path / "ref.log"),
        ],
        check=True,
        cwd=tmp_path,
    )
    out = tmp_path / "killed"
    for _round in range(2):  # killed twice: each time right after one more document finished
        before = len(list(out.glob("*.done"))) if out.exists() else 0
        proc = subprocess.Popen(
            [
                sys.executable,
                script,
                "0.05",
                *args,
                "--output-dir",
                str(out),
                "--log-file",
                str(tmp_path / "k.log"),
            ],
            cwd=tmp_path,
            start_new_session=True,
        )
        # Not a fixed delay: on a faster machine a fixed delay let the run finish first.
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(out.glob("*.done"))) > before:
                break
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = sorted(p.name for p in out.glob("*.done")) if out.exists() else []
    assert len(partial) < 6, "the run finished before it was killed; the test proves nothing"
    subprocess.run(
        [
            sys.executable,
            script,
            "0",
            *args,
            "--output-dir",
            str(out),
            "--log-file",
            str(tmp_path / "k2.log"),
        ],
        check=True,
        cwd=tmp_path,
    )
    assert not list(out.rglob("*.tmp-*"))
    assert _snapshot(out) == _snapshot(ref)


@pytest.mark.slow
def test_long_pdf_memory_is_bounded_by_window(tmp_path):
    """Peak RSS of the main process for a 600-page PDF stays near that of a 60-page one."""
    script = REPO / "tests" / "rss_run.py"
    peaks = {}
    for n in (60, 600):
        src = tmp_path / f"in{n}"
        pdfgen.many_pages_pdf(src / "long.pdf", n)
        r = subprocess.run(
            [
                sys.executable,
                str(script),
                "--input-dir",
                str(src),
                "--output-dir",
                str(tmp_path / f"o{n}"),
                "--progress",
                "none",
                "--batch-pages",
                "16",
                "--log-file",
                str(tmp_path / f"l{n}.log"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=True,
        )
        peaks[n] = int(r.stdout.strip().splitlines()[-1])
        assert len((tmp_path / f"o{n}" / "long.pages.jsonl").read_text().splitlines()) == n
    # 10x the pages may add page records (text) but never page images: < 25% growth
    assert peaks[600] < peaks[60] * 1.25, peaks


def test_copied_corpus_runs(tmp_path, run_fake):
    from conftest import corpus_dir

    d = corpus_dir("pdfs")
    src = tmp_path / "in"
    src.mkdir()
    for f in d.glob("*.pdf"):
        shutil.copy(f, src / f.name)
    code, out, _ = run_fake(src)
    assert code == 0
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["files"]["ok"] == len(list(src.glob("*.pdf")))
    assert _pages(out, "027-blank-push-pop")[0]["status"] == "blank"


def test_malformed_corpus_gives_clear_errors_or_recovers(tmp_path, run_fake):
    from conftest import corpus_dir

    d = corpus_dir("malformed")
    src = tmp_path / "in"
    src.mkdir()
    for f in d.glob("*.pdf"):
        shutil.copy(f, src / f.name)
    code, out, _ = run_fake(src, "--max-pages", "3", "--max-page-error-rate", "1")
    assert code == 1
    summary = json.loads((out / "_run_summary.json").read_text())
    by = {Path(x["source"]).name: x for x in summary["docs"]}
    assert set(by) == {f.name for f in src.glob("*.pdf")}  # every file has a record
    assert by["bad1.pdf"]["status"] == "failed" and "cannot open PDF" in by["bad1.pdf"]["error"]
    assert by["V4-aes.pdf"]["status"] == "ok"  # AES with an empty user password opens
    assert "password" in by["pypdf-sample-005-libreoffice-writer-password.pdf"]["error"]
    assert by["bad-xref.pdf"]["status"] == "ok" and by["xref-errors.pdf"]["status"] == "ok"
    for x in summary["docs"]:
        assert x["status"] == "ok" or x["error"]
    code, out2, _ = run_fake(src, "--password", "openpassword", out=tmp_path / "o2")
    recs = [
        json.loads(x)
        for x in (out2 / "pypdf-sample-005-libreoffice-writer-password.pages.jsonl").read_text().splitlines()
    ]
    assert recs and all(r["status"] for r in recs)


@pytest.mark.parametrize("assets", ["none", "figures", "pages"])
def test_figure_assets(tmp_path, run_fake, assets):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "sub" / "a.pdf", pages=1)
    code, out, _ = run_fake(src, "--assets", assets, figure=True)
    assert code == 0
    md = (out / "sub" / "a.md").read_text()
    crop = out / "sub" / "a_assets" / "p0001_fig01.png"
    if assets == "none":
        assert "<!-- figure -->" in md and not (out / "sub" / "a_assets").exists()
    else:
        from PIL import Image

        assert "](a_assets/p0001_fig01.png)" in md  # relative to the Markdown file
        w, h = Image.open(crop).size
        assert abs(w - 0.5 * 1190) < 4 and abs(h - 0.3 * 1684) < 4
    assert (out / "sub" / "a_assets" / "p0001.png").exists() is (assets == "pages")
