"""Run summary: totals by file and page status, counters, throughput; printed and saved as JSON."""

from __future__ import annotations

import os
import time
from typing import Any

from runner.config import RunConfig
from runner.jsonsafe import safe_dumps
from runner.pipeline import RunStats
from runner.records import DocResult

SUMMARY_NAME = "_run_summary.json"


def shard_summary_name(shard_index: int, num_shards: int) -> str:
    """Where one shard writes its summary (the --gpus launcher merges these into SUMMARY_NAME)."""
    return f"_run_summary.shard-{shard_index}-of-{num_shards}.json"


def summary_name(cfg: RunConfig) -> str:
    return shard_summary_name(cfg.shard_index, cfg.num_shards) if cfg.num_shards > 1 else SUMMARY_NAME


def build_summary(
    cfg: RunConfig, docs: list[DocResult], stats: RunStats, wall_s: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    files = {"ok": 0, "failed": 0, "skipped": 0}
    pages: dict[str, int] = {}
    counters: dict[str, int] = {}
    for d in docs:
        files[d.status] = files.get(d.status, 0) + 1
        for p in d.pages:
            pages[p.status.value] = pages.get(p.status.value, 0) + 1
            for k, v in p.counters.items():
                counters[k] = counters.get(k, 0) + int(v)
    n_pages = sum(pages.values())
    processing_s = max(1e-9, wall_s)
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stats.started_wall)),
        "wall_seconds": round(wall_s, 3),
        "engine_startup_s": round(stats.engine_startup_s, 3),
        "engine": cfg.engine,
        "model": cfg.engine_config.model if cfg.engine != "text" else None,
        "mode": cfg.mode,
        "dpi": cfg.dpi,
        "shard": f"{cfg.shard_index}-of-{cfg.num_shards}",
        "files": files,
        "pages": dict(sorted(pages.items())),
        "pages_total": n_pages,
        "pages_per_s": round(n_pages / processing_s, 4) if n_pages else 0.0,
        "loop_rate": round(stats.loop_pages / stats.engine_pages, 4) if stats.engine_pages else 0.0,
        "retries": {
            "attempted": stats.retries_attempted,
            "improved": stats.retries_improved,
            "large_pass": stats.large_pass,
            "large_improved": stats.large_improved,
            "roi_improved": stats.roi_improved,
        },
        "engine_restarts": stats.engine_restarts,
        "pages_resubmitted": stats.resubmitted,
        "render_worker_restarts": stats.render_worker_restarts,
        "render_seconds_total": round(stats.render_seconds, 3),
        "counters": dict(sorted(counters.items())),
        "timeline": stats.timeline,
        # one entry per shard/GPU; the --gpus launcher concatenates its workers' entries
        "shards": [
            {
                "shard": f"{cfg.shard_index}-of-{cfg.num_shards}",
                "gpu": os.environ.get("CUDA_VISIBLE_DEVICES") or None,
                "pages": n_pages,
                "pages_per_s": round(n_pages / processing_s, 4) if n_pages else 0.0,
            }
        ],
        "docs": [
            {
                "source": d.source,
                "output": d.output_stem,
                "status": d.status,
                "pages": len(d.pages),
                "seconds": round(d.seconds, 3),
                "error": d.error,
            }
            for d in docs
        ],
        **(extra or {}),
    }


def print_summary(summary: dict[str, Any], path: str, console_file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=console_file, stderr=console_file is None, highlight=False)
    t = Table(title="Run summary", show_header=False)
    t.add_column("what")
    t.add_column("value")
    f = summary["files"]
    t.add_row("files", f"{f.get('ok', 0)} ok, {f.get('failed', 0)} failed, {f.get('skipped', 0)} skipped")
    t.add_row("pages", ", ".join(f"{k} {v}" for k, v in summary["pages"].items()) or "0")
    t.add_row("throughput", f"{summary['pages_per_s']:.2f} pages/s over {summary['wall_seconds']:.1f} s")
    if summary.get("engine_startup_s"):
        t.add_row("engine start-up", f"{summary['engine_startup_s']:.1f} s (not in throughput)")
    r = summary["retries"]
    if r["attempted"] or r["large_pass"]:
        t.add_row(
            "retries",
            f"{r['attempted']} retried ({r['improved']} fixed), Large pass {r['large_pass']} "
            f"({r['large_improved']} improved), loop rate {summary['loop_rate']:.1%}",
        )
    if summary.get("engine_restarts"):
        t.add_row("engine restarts", str(summary["engine_restarts"]))
    failed = [d for d in summary["docs"] if d["status"] == "failed"]
    for d in failed[:20]:
        t.add_row("[red]failed[/red]", f"{d['source']}: {d['error']}")
    if len(failed) > 20:
        t.add_row("", f"... {len(failed) - 20} more in {path}")
    t.add_row("summary", path)
    console.print(t)


def dumps(summary: dict[str, Any]) -> bytes:
    return safe_dumps(summary, indent=1).encode("utf-8")
