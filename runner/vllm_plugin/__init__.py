"""vLLM plugin pieces (engine stage). ``guard_processor`` and ``fast_processor`` import vLLM at
their top: import them only from code that already runs under vLLM (the vLLM engine, the
engine-core process, the benchmark). ``preprocess`` imports only numpy and PIL: it runs in the
render workers.

- ``guard_processor``: the batch-level n-gram guard as a vLLM v1 ``LogitsProcessor``.
- ``fast_processor``: a multimodal processor for DeepSeek-OCR / OCR-2 that accepts the model's
  input tensors precomputed by the render workers.
- ``preprocess``: computes those tensors (same PIL operations as vLLM's processor).
"""

import logging
import os


def register_all() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins``): install the model subclasses in
    every vLLM process. The engine core is a *spawned* process: a registration made only in the
    CLI's process does not reach it, and the model code that runs there (the batched vision
    encoder) would silently be upstream's. ``RUNNER_VLLM_PLUGIN=0`` turns it off."""
    if os.environ.get("RUNNER_VLLM_PLUGIN", "1") == "0":
        return
    try:
        from runner import stacksample
        from runner.vllm_plugin.fast_processor import register

        register()
        # diagnostics, off by default: the engine core samples its own threads (RUNNER_STACK_SAMPLE_CORE)
        stacksample.watch_in_child_from_env(logging.getLogger("vllm.deepseek_ocr_pipeline"))
    except Exception:  # vLLM calls this in every process: a failure here must not stop vLLM
        logging.getLogger("vllm.deepseek_ocr_pipeline").exception(
            "deepseek-ocr-pipeline plugin not registered; upstream's model code runs"
        )
