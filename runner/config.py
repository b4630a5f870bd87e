"""Run configuration: one frozen, validated object built by the CLI and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("vllm", "hf", "text")
MODES = ("clean", "grounded")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


@dataclass(frozen=True)
class EngineConfig:
    """Options for the model engines (vLLM and Transformers). Ignored by the text engine."""

    model: str = "deepseek-ai/DeepSeek-OCR"  # hub id or local folder
    resolution: str | None = None  # None = the adapter's default (gundam)
    kv_cache_dtype: str = "fp8"
    enable_fp8_weights: bool = False
    quantization: str | None = None  # explicit vLLM quantization method (overrides fp8 weights)
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 512  # measured faster than 256 on an H100 (tmp_pdf_runs/GPU_NOTES.md)
    max_model_len: int = 8192
    max_num_batched_tokens: int | None = None  # vLLM's per-step token budget; None = vLLM's default
    max_tokens: int = 8192
    tensor_parallel_size: int = 1
    mm_encoder_tp_mode: str | None = None  # "weights" | "data"
    seed: int = 0
    ngram_size: int = 30
    ngram_window: int = 90
    guard: bool = True
    load_format: str = "auto"  # "dummy" for benchmarks with random weights
    ignore_eos: bool = False  # force the output length (benchmarks with dummy weights)
    cache_dir: str | None = None  # Hugging Face cache dir
    profile: str = "auto"  # "auto" | "default" | "low-vram" (runner/profiles.py)
    cpu_offload_gb: float = 0.0
    #: hard cap (GiB) on the engine core's PyTorch allocator; set by --gpu-memory-gib
    #: (runner/vllm_plugin/memory_cap.py). None: no cap.
    torch_memory_cap_gib: float | None = None
    hf_batch_size: int = 4
    device: str | None = None  # Transformers engine device ("cuda", "cpu"); None = auto
    warmup_pages: int = -1  # vLLM warm-up batch before timing starts; -1 = min(max_num_seqs, 512)
    #: more ``vllm.LLM`` keyword arguments, as (name, value text); the text is JSON when it parses
    #: (``--vllm-arg enable_prefix_caching=false``), else a string. Applied last; dicts are merged.
    vllm_args: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not 0.01 <= self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in [0.01, 1.0]")
        for name in (
            "max_num_seqs",
            "max_model_len",
            "max_tokens",
            "tensor_parallel_size",
            "ngram_size",
            "ngram_window",
            "hf_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.ngram_window < self.ngram_size:
            raise ConfigError("--ngram-window must be >= --ngram-size")
        for name, _ in self.vllm_args:
            if not name.isidentifier():
                raise ConfigError(f"--vllm-arg {name!r}: expected NAME=VALUE with a vllm.LLM argument name")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"):
            raise ConfigError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not supported")
        if self.profile not in ("auto", "default", "low-vram"):
            raise ConfigError("--profile must be auto, default or low-vram")


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]  # resolved input PDF paths/URIs, sorted, deduplicated
    input_root: str  # common root used to derive output names
    output_dir: str
    mode: str = "clean"
    engine: str = "vllm"
    dpi: float = 144.0
    max_pages: int | None = None  # per document
    batch_pages: int = 64  # pages in flight (rendering + engine)
    force: bool = False
    log_file: str | None = None
    password: str | None = None
    render_workers: int = 2
    render_timeout_s: float = 60.0
    open_timeout_s: float = 60.0
    render_memory_mb: int = 4096
    max_page_pixels: int = 40_000_000
    blank_ink_threshold: float = 2e-5  # runner.blank.DEFAULT_THRESHOLD (kept import-free here)
    table_format: str = "html"
    assets: str = "none"  # "none" | "figures" | "pages"
    # retries (see runner/schedule.py)
    retry_temperatures: tuple[float, ...] = (0.2, 0.5)
    retry_large: bool = True
    retry_large_cap: int = 1000
    required_labels: tuple[str, ...] = ("table",)
    roi_pass: bool = False
    roi_labels: tuple[str, ...] = ("table", "title", "text")
    max_page_error_rate: float = 0.1
    engine_restarts: int = 2
    engine_stall_timeout_s: float = 900.0  # no page back for this long with pages in flight = dead
    num_shards: int = 1
    shard_index: int = 0
    report: bool = False
    progress: str = "auto"  # "auto" | "bar" | "log" | "none"
    engine_config: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {MODES}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {ENGINES}")
        if not 36 <= self.dpi <= 600:
            raise ConfigError("--dpi must be between 36 and 600")
        if self.max_pages is not None and self.max_pages < 1:
            raise ConfigError("--max-pages must be >= 1")
        if self.batch_pages < 1:
            raise ConfigError("--batch-pages must be >= 1")
        if self.render_workers < 1:
            raise ConfigError("--render-workers must be >= 1")
        if self.render_memory_mb != 0 and self.render_memory_mb < 256:
            raise ConfigError("--render-memory-mb must be 0 (no limit) or >= 256: workers need that to start")
        if self.render_timeout_s <= 0:
            raise ConfigError("--render-timeout must be > 0")
        if self.table_format not in ("html", "markdown"):
            raise ConfigError("--table-format must be html or markdown")
        if self.assets not in ("none", "figures", "pages"):
            raise ConfigError("--assets must be none, figures or pages")
        if not 0.0 <= self.max_page_error_rate <= 1.0:
            raise ConfigError("--max-page-error-rate must be in [0, 1]")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError("--shard-index must be in [0, --num-shards)")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)
