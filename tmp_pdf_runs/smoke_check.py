"""Check a CLI smoke run (GPU runs, tooling): every input PDF has a Markdown file or a recorded
failure, every page of every written document has exactly one status. Prints one JSON line."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def main(inp: str, out: str) -> int:
    pdfs = sorted(p.stem for p in Path(inp).glob("*.pdf"))
    outp = Path(out)
    statuses: collections.Counter[str] = collections.Counter()
    missing_md, pages, bad = [], 0, []
    for stem in pdfs:
        if not (outp / f"{stem}.md").is_file():
            missing_md.append(stem)
        pj = outp / f"{stem}.pages.jsonl"
        if pj.is_file():
            recs = [json.loads(line) for line in pj.read_text().splitlines() if line.strip()]
            nums = [r["page"] for r in recs]
            if len(nums) != len(set(nums)) or (nums and sorted(nums) != list(range(1, max(nums) + 1))):
                bad.append(stem)
            pages += len(recs)
            statuses.update(r["status"] for r in recs)
    summary = {}
    sp = outp / "_run_summary.json"
    if sp.is_file():
        s = json.loads(sp.read_text())
        summary = {
            k: s.get(k)
            for k in (
                "files",
                "pages",
                "pages_total",
                "engine_startup_s",
                "wall_seconds",
                "engine_restarts",
                "pages_resubmitted",
                "retries",
                "loop_rate",
            )
        }
    print(
        json.dumps(
            {
                "out": out,
                "pdfs": len(pdfs),
                "missing_md": missing_md,
                "pages": pages,
                "statuses": dict(statuses),
                "page_numbering_errors": bad,
                "summary": summary,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
