"""vLLM plugin pieces (engine stage). ``guard_processor`` and ``fast_processor`` import vLLM at
their top: import them only from code that already runs under vLLM (the vLLM engine, the
engine-core process, the benchmark). ``preprocess`` imports only numpy and PIL: it runs in the
render workers.

- ``guard_processor``: the batch-level n-gram guard as a vLLM v1 ``LogitsProcessor``.
- ``fast_processor``: a multimodal processor for DeepSeek-OCR / OCR-2 that accepts the model's
  input tensors precomputed by the render workers.
- ``preprocess``: computes those tensors (same PIL operations as vLLM's processor).
"""
