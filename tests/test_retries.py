"""No page left behind: loop retries, the Large-mode phase, fallbacks and engine deaths."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pdfgen
import pytest


def _recs(out: Path, stem: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"{stem}.pages.jsonl").read_text().splitlines()]


def test_loop_is_retried_with_rising_temperature(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=3)
    code, out, _ = run_fake(src, loop_pages={("a.pdf", 1): 2})
    assert code == 0
    recs = _recs(out, "a")
    assert [r["status"] for r in recs] == ["ok", "retried_ok", "ok"]
    att = recs[1]["attempts"]
    assert [a["temperature"] for a in att] == [0.0, 0.2, 0.5]
    assert [a["degenerate"] is not None for a in att] == [True, True, False]
    assert att[0]["finish_reason"] == "length" and att[0]["stopped_by_eos"] is False
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["retries"]["attempted"] == 2 and summary["retries"]["improved"] == 1
    assert summary["loop_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert "The same line again" not in (out / "a.md").read_text()


def test_large_phase_rescues_pages_and_reuses_one_engine(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    pdfgen.text_pdf(src / "b.pdf", pages=2)
    code, out, factory = run_fake(src, loop_all_attempts_in_base={("a.pdf", 0), ("b.pdf", 1)})
    assert code == 0
    assert [r["status"] for r in _recs(out, "a")] == ["large_ok", "ok"]
    assert [r["status"] for r in _recs(out, "b")] == ["ok", "large_ok"]
    large_engines = [e for e in factory.engines if e.resolution == "large"]
    assert len(large_engines) == 1 and len(large_engines[0].seen) == 2  # one engine for all PDFs
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["retries"]["large_pass"] == 2 and summary["retries"]["large_improved"] == 2


def test_large_pages_are_prepared_by_the_render_workers_at_large_resolution(tmp_path, run_fake):
    """An engine that takes the resolution per request (vLLM with the plugin processor) keeps
    running the Large pass; its pages come from the render workers already prepared at Large."""
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    code, out, factory = run_fake(
        src,
        loop_all_attempts_in_base={("a.pdf", 1)},
        supports_request_resolution=True,
        worker_hook=("slow_hook:tag_resolution", {"res": "gundam"}),
    )
    assert code == 0
    assert [r["status"] for r in _recs(out, "a")] == ["ok", "large_ok"]
    assert len(factory.engines) == 1  # no second engine
    seen = factory.engines[0].seen
    main = [s for s in seen if s.resolution is None]
    large = [s for s in seen if s.resolution == "large"]
    assert main and all(s.hook == "gundam" for s in main)
    assert [(s.page_index, s.hook) for s in large] == [(1, "large")]


def test_large_cap_and_fallback_to_text_layer(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=3)
    loops = {("a.pdf", i): 99 for i in range(3)}
    code, out, _ = run_fake(src, "--retry-large-cap", "1", "--max-page-error-rate", "1", loop_pages=loops)
    recs = _recs(out, "a")
    assert [r["status"] for r in recs] == ["fallback_text_layer"] * 3
    assert sum(1 for r in recs if any(a["resolution"] == "large" for a in r["attempts"])) == 1
    md = (out / "a.md").read_text()
    assert "Page 2 heading" in md and "The same line again" not in md
    assert code == 0


def test_no_text_layer_gives_failed_stub_and_fails_document(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.image_only_pdf(src / "scan.pdf", text="Scanned words")
    code, out, _ = run_fake(src, "--no-large-pass", loop_pages={("scan.pdf", 0): 99})
    assert code == 1
    (rec,) = _recs(out, "scan")
    assert rec["status"] == "failed" and len(rec["attempts"]) == 3
    assert "[[OCR failed:" in (out / "scan.md").read_text()
    assert not (out / "scan.done").exists()


def test_required_table_label_triggers_large_pass(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.pdf_with_pages(src / "t.pdf", ["table", "text"])
    code, out, factory = run_fake(src)
    assert code == 0
    recs = _recs(out, "t")
    # the fake never emits a table: the Large pass is tried for the table page only, and the
    # original reading is kept (with a note) when it does not find the table either
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert "large pass did not find the label" in recs[0]["notes"]
    large = [e for e in factory.engines if e.resolution == "large"]
    assert len(large) == 1 and [(s.doc, s.page_index) for s in large[0].seen] == [("t.pdf", 0)]


def test_engine_death_restarts_and_resends_without_loss_or_duplicates(tmp_path, run_fake):
    src = tmp_path / "in"
    for i in range(3):
        pdfgen.text_pdf(src / f"d{i}.pdf", pages=4, prefix=f"D{i}")
    code, out, factory = run_fake(src, "--batch-pages", "6", die_after_outputs=5)
    assert code == 0
    eng = factory.engines[-1]
    assert eng.restarts == 1
    for i in range(3):
        recs = _recs(out, f"d{i}")
        assert [r["page"] for r in recs] == [1, 2, 3, 4]
        assert all(r["status"] == "ok" for r in recs)
        md = (out / f"d{i}.md").read_text()
        assert md.count(f"D{i} 1 heading") == 1
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["engine_restarts"] == 1 and summary["pages_resubmitted"] > 0


def test_engine_that_keeps_dying_fails_run_cleanly(tmp_path, run_fake, monkeypatch):
    from fakes import FakeEngine

    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    monkeypatch.setattr(FakeEngine, "restart", lambda self: setattr(self, "die_after_outputs", 0))
    code, out, _ = run_fake(src, "--engine-restarts", "2", die_after_outputs=0)
    assert code == 3  # EXIT_ENGINE: the engine died more often than allowed
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["files"]["failed"] == 1
    assert "engine failed" in summary["docs"][0]["error"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_faults_account_for_every_page(tmp_path, run_fake, seed):
    rng = random.Random(seed)
    src = tmp_path / "in"
    n_pages = {}
    for i in range(4):
        n = rng.randint(1, 5)
        n_pages[f"r{i}"] = n
        pdfgen.text_pdf(src / f"r{i}.pdf", pages=n, prefix=f"R{i}")
    loops = {
        (f"r{i}.pdf", p): rng.choice([0, 0, 1, 3, 99]) for i in range(4) for p in range(n_pages[f"r{i}"])
    }
    code, out, _ = run_fake(
        src,
        "--batch-pages",
        str(rng.randint(1, 8)),
        "--max-page-error-rate",
        "1",
        loop_pages=loops,
        die_after_outputs=rng.randint(0, 10),
    )
    assert code == 0
    for stem, n in n_pages.items():
        recs = _recs(out, stem)
        assert [r["page"] for r in recs] == list(range(1, n + 1))
        for r in recs:
            want = loops[(f"{stem}.pdf", r["page"] - 1)]
            if want == 0:
                assert r["status"] == "ok"
            elif want <= 2:
                assert r["status"] == "retried_ok"
            else:
                assert r["status"] in ("large_ok", "fallback_text_layer")


def test_roi_pass_rereads_regions_from_sharper_crops(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    code, out, factory = run_fake(src, "--mode", "grounded", "--roi-pass", "--no-large-pass")
    assert code == 0
    recs = _recs(out, "a")
    assert [r["status"] for r in recs] == ["roi_improved", "roi_improved"]
    assert any(n.startswith("roi: region 0 (text) replaced") for n in recs[0]["notes"])
    md = (out / "a.md").read_text()
    assert "Sharper reading of a region of page 1" in md and "Sharper reading of a region of page 2" in md
    roi_seen = [s for e in factory.engines for s in e.seen if s.prompt_mode == "roi"]
    assert len(roi_seen) == 2
    # regions of grounded output stay well-formed and in PDF points
    regions = [json.loads(x) for x in (out / "a.regions.jsonl").read_text().splitlines()]
    assert regions and all(len(r["box_pt"][0]) == 4 for r in regions)
    assert any("Sharper reading of a region of page 1" in r["text"] for r in regions)  # the merged reading
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["retries"]["roi_improved"] == 2


def test_roi_pass_off_in_clean_mode(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=1)
    code, out, _ = run_fake(src, "--roi-pass")
    assert code == 0 and _recs(out, "a")[0]["status"] == "ok"


def test_stalled_engine_is_detected_and_pages_resent(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=4)
    code, out, factory = run_fake(src, "--engine-stall-timeout", "2", lose_once=2)
    assert code == 0
    assert [r["status"] for r in _recs(out, "a")] == ["ok"] * 4
    assert factory.engines[-1].restarts == 1
    assert json.loads((out / "_run_summary.json").read_text())["engine_restarts"] == 1


def test_engine_found_dead_on_submit_is_restarted(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=4)
    code, out, factory = run_fake(src, submit_dies_once=2)
    assert code == 0
    assert [r["status"] for r in _recs(out, "a")] == ["ok"] * 4
    assert factory.engines[-1].restarts == 1


def test_restart_that_fails_ends_run_with_records_and_exit_3(tmp_path, run_fake):
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    pdfgen.text_pdf(src / "b.pdf", pages=2)
    code, out, _ = run_fake(src, die_after_outputs=1, restart_fails=True)
    assert code == 3
    summary = json.loads((out / "_run_summary.json").read_text())
    assert sum(summary["files"].values()) == 2  # every input has a record
    assert any("restart failed" in (d["error"] or "") for d in summary["docs"])


def test_parked_documents_release_their_input_until_the_large_phase(tmp_path, run_fake, monkeypatch):
    import contextlib

    from runner.storage import LocalStorage

    opened: list[str] = []
    active: set[str] = set()
    original = LocalStorage.local_path

    @contextlib.contextmanager
    def tracking(self, rel):
        opened.append(rel)
        active.add(rel)
        with original(self, rel) as p:
            yield p
        active.discard(rel)

    monkeypatch.setattr(LocalStorage, "local_path", tracking)
    src = tmp_path / "in"
    pdfgen.text_pdf(src / "a.pdf", pages=2)
    code, out, _ = run_fake(src, loop_all_attempts_in_base={("a.pdf", 1)})
    assert code == 0
    assert [r["status"] for r in _recs(out, "a")] == ["ok", "large_ok"]
    assert opened == ["a.pdf", "a.pdf"]  # released while parked, reopened for the Large phase
    assert not active  # and closed at the end
