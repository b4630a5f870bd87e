"""GPU check: the Transformers engine's DeepSeek-OCR (v1) against vLLM's own implementation.

No real weights exist here, so both sides load the same random checkpoint in upstream's layout
(``tests/tiny_model.build_tiny_ocr1(full_vision=True)``: upstream's full SAM ViT-B and CLIP-L, which
vLLM builds at fixed sizes, and a small language model), in float32, greedy, on the same page
images and the same prompt token ids. Compared: the expanded prompt (image-token count and
placement), the generated token ids, and each generated token's log-probability.

Three phases, each its own process (vLLM runs with the machine's Transformers; the engine needs
Transformers >= 5.23, put first on PYTHONPATH for the other two)::

    python tools/check_hf_ocr1.py build --work /tmp/ck1
    VLLM_PLUGINS=none python tools/check_hf_ocr1.py vllm --work /tmp/ck1   # upstream vLLM only
    python tools/check_hf_ocr1.py hf --work /tmp/ck1 --jsonl OUT.jsonl      # compares, writes a row
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools"))

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
BOS = "<｜begin▁of▁sentence｜>"


def _images(n: int) -> list[Any]:
    from bench_hf import a4_pages

    return a4_pages(n, None)


def _prompt_ids(tokenizer: Any) -> list[int]:
    return list(tokenizer(BOS + PROMPT, add_special_tokens=False).input_ids)


def build(work: Path, full_vision: bool = True) -> None:
    import tiny_model

    tiny_model.build_tiny_ocr1(work / "model", full_vision=full_vision)
    print("built", work / "model")


def run_vllm(work: Path, pages: int, tokens: int) -> None:
    import vllm
    from transformers import PreTrainedTokenizerFast
    from vllm import LLM, SamplingParams

    tok = PreTrainedTokenizerFast.from_pretrained(str(work / "model"))
    llm = LLM(
        model=str(work / "model"),
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=4096,
        max_num_seqs=pages,
        limit_mm_per_prompt={"image": 1},
        enable_prefix_caching=False,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=1)
    ids = _prompt_ids(tok)
    outs = llm.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": {"image": im}} for im in _images(pages)], params
    )
    rows = []
    for o in outs:
        c = o.outputs[0]
        rows.append(
            {
                "prompt_token_ids": list(o.prompt_token_ids),
                "token_ids": list(c.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
            }
        )
    (work / "vllm.json").write_text(json.dumps({"vllm": vllm.__version__, "rows": rows}))
    print("vllm rows", len(rows), "prompt tokens", [len(r["prompt_token_ids"]) for r in rows])


def run_hf(work: Path, pages: int, tokens: int, jsonl: Path | None, device: str = "cuda") -> int:
    import dataclasses

    import torch
    import transformers

    from runner.config import EngineConfig
    from runner.engines.hf_engine import _ocr1_inputs, load_model

    ref = json.loads((work / "vllm.json").read_text())
    lm = load_model(EngineConfig(model=str(work / "model"), device=device))
    lm = dataclasses.replace(lm, model=lm.model.float(), dtype=torch.float32)
    inputs = _ocr1_inputs(lm, _images(pages), [BOS + PROMPT] * pages, None)
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    for key in ("pixel_values", "pixel_values_local"):
        if key in inputs:
            inputs[key] = inputs[key].float()
    width = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = lm.model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            eos_token_id=lm.special.eos,
            pad_token_id=lm.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (pages, tokens, vocab)
    result: dict[str, Any] = {
        "prompt_equal": [],
        "tokens_equal": [],
        "first_diff": [],
        "max_logprob_diff": [],
    }
    for i, r in enumerate(ref["rows"]):
        mask = inputs["attention_mask"][i].bool()
        prompt = inputs["input_ids"][i][mask].tolist()
        gen = out.sequences[i, width:].tolist()
        result["prompt_equal"].append(prompt == r["prompt_token_ids"])
        result["tokens_equal"].append(gen == r["token_ids"])
        diff = next((j for j, (a, b) in enumerate(zip(gen, r["token_ids"])) if a != b), None)
        result["first_diff"].append(diff)
        upto = diff if diff is not None else len(gen)
        lp = [float(logprobs[i, j, r["token_ids"][j]]) for j in range(upto)]
        result["max_logprob_diff"].append(
            max((abs(a - b) for a, b in zip(lp, r["logprobs"][:upto])), default=0.0)
        )
    ok = (
        all(result["prompt_equal"]) and all(result["tokens_equal"]) and max(result["max_logprob_diff"]) < 1e-2
    )
    row = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bench": "hf_ocr1_vs_vllm",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": ref["vllm"],
        "model": "random DeepSeek-OCR checkpoint, upstream layout: "
        "full SAM ViT-B + CLIP-L, LM hidden 64 / 2 layers",
        "dtype": "float32",
        "pages": pages,
        "tokens": tokens,
        "prompt_tokens": [len(r["prompt_token_ids"]) for r in ref["rows"]],
        "passed": ok,
        **result,
    }
    print(json.dumps(row))
    if jsonl:
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("build", "vllm", "hf"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--pages", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--jsonl", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="build: tiny vision too (a CPU smoke test)")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.phase == "build":
        build(a.work, full_vision=not a.tiny)
    elif a.phase == "vllm":
        run_vllm(a.work, a.pages, a.tokens)
    else:
        return run_hf(a.work, a.pages, a.tokens, a.jsonl, a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
