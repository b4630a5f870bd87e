"""Command line: parse arguments into one ``RunConfig``, run the pipeline, report, exit code.

Exit codes: 0 every file succeeded (or was already done); 1 some files failed; 2 usage error;
3 the engine cannot run here (missing vLLM/GPU/model) or died beyond its restart budget
(documents it could not finish are recorded as failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runner.config import ENGINES, MODES, ConfigError, EngineConfig, RunConfig

if TYPE_CHECKING:
    from runner.executors.ray_executor import RayOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENGINE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # the shell's 128 + SIGINT / SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised on the main thread like Ctrl-C so that every ``finally`` runs."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(f"signal {signum}")


log = logging.getLogger("runner")


def build_parser(default_engine: str = "vllm") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0])
        if sys.argv and sys.argv[0].endswith(".py")
        else "python -m runner",
        description="Convert PDFs to Markdown with DeepSeek-OCR / DeepSeek-OCR-2 (vLLM), Transformers, "
        "or the PDF's own text layer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # '--pass SECRET' must not slip past the password redaction
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input-dir", help="folder (searched recursively) or s3://bucket/prefix with PDFs")
    io.add_argument("--input-list", help="file with one PDF path per line")
    io.add_argument("--output-dir", required=True, help="output folder or s3://bucket/prefix")
    io.add_argument(
        "--mode",
        choices=MODES,
        default="clean",
        help="clean: Markdown only; grounded: keep labels and boxes, write <stem>.regions.jsonl",
    )
    io.add_argument(
        "--engine",
        choices=ENGINES,
        default=default_engine,
        help="vllm: GPU; hf: Transformers (GPU or CPU); text: the PDF's own text layer, no model",
    )
    io.add_argument("--dpi", type=float, default=144.0)
    io.add_argument("--max-pages", type=int, help="only the first N pages of each PDF")
    io.add_argument(
        "--batch-pages",
        type=int,
        default=None,
        help="pages in flight (rendering + engine); default for vllm: a running batch "
        "(--max-num-seqs) plus a queued one, within 30%% of the host's free memory; 16 otherwise",
    )
    io.add_argument("--force", action="store_true", help="redo PDFs that already have a done marker")
    io.add_argument("--log-file", help="default: tmp_pdf_runs/logs/run-<time>.log")
    io.add_argument("--password", help="password for encrypted PDFs (never logged); or env PDF_PASSWORD")
    io.add_argument("--table-format", choices=("html", "markdown"), default="html")
    io.add_argument(
        "--assets",
        choices=("none", "figures", "pages"),
        default="none",
        help="save figure crops (and page images) into <stem>_assets/",
    )
    io.add_argument("--report", action="store_true", help="write <stem>.review.html and _run.html")
    io.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto")
    io.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS default)")

    rd = p.add_argument_group("rendering and isolation")
    rd.add_argument("--render-workers", type=int, default=None, help="default: min(8, CPUs)")
    rd.add_argument("--render-timeout", type=float, default=60.0, help="seconds per page")
    rd.add_argument(
        "--render-memory-mb", type=int, default=4096, help="memory limit per render worker (0 = none)"
    )
    rd.add_argument("--max-page-pixels", type=int, default=40_000_000, help="pages above this are too_large")
    rd.add_argument(
        "--blank-threshold", type=float, default=2e-5, help="ink fraction under which a page is blank"
    )

    rt = p.add_argument_group("retries and fallbacks")
    rt.add_argument("--retries", type=int, default=2, help="retries of a looping page (temperature schedule)")
    rt.add_argument("--retry-temperatures", default="0.2,0.5", help="temperature per retry, comma separated")
    rt.add_argument("--no-large-pass", action="store_true", help="no second phase in Large mode")
    rt.add_argument("--retry-large-cap", type=int, default=1000, help="max pages sent to the Large pass")
    rt.add_argument(
        "--required-labels",
        default="table",
        help="labels a page must yield when the PDF shows them (comma separated; '' = none)",
    )
    rt.add_argument("--roi-pass", action="store_true", help="grounded runs: re-read selected regions sharper")
    rt.add_argument("--roi-labels", default="table,title,text")
    rt.add_argument(
        "--max-page-error-rate",
        type=float,
        default=0.01,
        help="a PDF with a larger share of failed pages counts as failed",
    )
    rt.add_argument("--engine-restarts", type=int, default=2, help="restarts of a dead engine per run")
    rt.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=900.0,
        help="seconds without any page coming back (pages in flight) before the engine "
        "is treated as dead and restarted",
    )

    sc = p.add_argument_group("scale-out")
    sc.add_argument("--num-shards", type=int, default=1)
    sc.add_argument("--shard-index", type=int, default=0)
    sc.add_argument("--gpus", help="one worker per GPU: '0,1,...' or 'all'")
    sc.add_argument(
        "--engines-per-gpu",
        type=int,
        default=1,
        help="with --gpus: K engines (workers) per GPU, each with 1/K of the memory, started one "
        "after another (vLLM's host work per step leaves one engine's GPU idle part of the time)",
    )
    sc.add_argument(
        "--mps",
        action="store_true",
        help="with --gpus: run the workers under a private CUDA MPS control daemon (started and "
        "stopped by this run), so engines sharing a GPU run their kernels side by side instead "
        "of time-slicing; needs nvidia-cuda-mps-control (NVIDIA driver)",
    )
    from runner.executors.ray_executor import add_ray_arguments

    add_ray_arguments(p)

    en = p.add_argument_group("model engine (vllm, hf)")
    d = EngineConfig()
    en.add_argument(
        "--model",
        default=d.model,
        help="hub id or local folder (DeepSeek-OCR or DeepSeek-OCR-2; --engine hf runs DeepSeek-OCR "
        "with transformers>=5.23)",
    )
    en.add_argument("--resolution", help="tiny|small|base|large|gundam (OCR-2: base|gundam); default gundam")
    en.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype)
    en.add_argument("--enable-fp8-weights", action="store_true", help="fp8 weight quantization (vLLM)")
    en.add_argument("--quantization", help="explicit vLLM quantization method")
    en.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    en.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="GPU memory the whole run may use (GiB), CUDA contexts and what vLLM does not count "
        "included: sets --gpu-memory-utilization to leave room for them (e.g. 5.5 on a 6 GB laptop GPU)",
    )
    en.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    en.add_argument("--max-model-len", type=int, default=d.max_model_len)
    en.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help="tokens per engine step (vLLM; smaller = smaller activation peak)",
    )
    en.add_argument("--max-tokens", type=int, default=d.max_tokens)
    en.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another vllm.LLM argument, repeatable; VALUE is JSON when it parses, else text "
        "(e.g. enable_prefix_caching=false, jit_monitor_verbose=true, "
        "enable_logging_iteration_details=true)",
    )
    en.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    en.add_argument("--mm-encoder-tp-mode", choices=("weights", "data"))
    en.add_argument("--seed", type=int, default=d.seed)
    en.add_argument("--ngram-size", type=int, default=d.ngram_size)
    en.add_argument("--ngram-window", type=int, default=d.ngram_window)
    en.add_argument("--no-guard", action="store_true", help="disable the repetition guard")
    en.add_argument("--load-format", default=d.load_format, help="'dummy' = random weights (benchmarks)")
    en.add_argument("--ignore-eos", action="store_true", help="force max-tokens output (benchmarks)")
    en.add_argument("--cache-dir", help="Hugging Face cache folder")
    en.add_argument("--profile", choices=("auto", "default", "low-vram"), default=d.profile)
    en.add_argument("--cpu-offload-gb", type=float, default=d.cpu_offload_gb)
    en.add_argument("--hf-batch-size", type=int, default=d.hf_batch_size)
    en.add_argument("--device", help="Transformers engine device (cuda, cpu)")
    en.add_argument(
        "--warmup-pages",
        type=int,
        default=d.warmup_pages,
        help="vLLM warm-up batch size before timing (-1 = min(max-num-seqs, 512), 0 = none)",
    )
    return p


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def discover_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(input root, relative paths of the PDFs)."""
    from runner.naming import common_root, read_input_list
    from runner.storage import open_storage

    if args.input_dir and args.input_list:
        raise ConfigError("give --input-dir or --input-list, not both")
    if args.input_dir:
        if not args.input_dir.startswith("s3://") and not Path(args.input_dir).is_dir():
            raise ConfigError(f"--input-dir {args.input_dir}: not a folder")
        store = open_storage(args.input_dir)
        return args.input_dir, store.list_files()
    if args.input_list:
        if not Path(args.input_list).is_file():
            raise ConfigError(f"--input-list {args.input_list}: no such file")
        paths = read_input_list(args.input_list)
        root = common_root(paths)
        return root, [os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/") for p in paths]
    raise ConfigError("give --input-dir or --input-list")


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--vllm-arg {text!r}: expected NAME=VALUE")
    return name.strip(), value


def _vllm_window(ec: EngineConfig, dpi: float) -> int:
    from runner.launcher import workers_on_host
    from runner.profiles import inflight_window

    window, why = inflight_window(ec.max_num_seqs, dpi, workers_on_host())
    log.info("in-flight window: %d pages (%s)", window, why)
    return window


def config_from_args(args: argparse.Namespace, inputs: tuple[str, ...], root: str) -> RunConfig:
    temps = tuple(float(t) for t in _split(args.retry_temperatures))[: max(0, args.retries)]
    if args.retries > len(temps) and temps:
        temps = temps + (temps[-1],) * (args.retries - len(temps))
    ec = EngineConfig(
        model=args.model,
        resolution=args.resolution,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_fp8_weights=args.enable_fp8_weights,
        quantization=args.quantization,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        vllm_args=tuple(_name_value(x) for x in args.vllm_arg),
        max_tokens=args.max_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        mm_encoder_tp_mode=args.mm_encoder_tp_mode,
        seed=args.seed,
        ngram_size=args.ngram_size,
        ngram_window=args.ngram_window,
        guard=not args.no_guard,
        load_format=args.load_format,
        ignore_eos=args.ignore_eos,
        cache_dir=args.cache_dir,
        profile=args.profile,
        cpu_offload_gb=args.cpu_offload_gb,
        hf_batch_size=args.hf_batch_size,
        device=args.device,
        warmup_pages=args.warmup_pages,
    )
    if args.engine != "text":
        ec = _apply_profile(ec, args.gpu_memory_gib if args.engine == "vllm" else None)
    # The window must exceed what the engine runs at once, or the GPU idles while pages render.
    batch = args.batch_pages or (_vllm_window(ec, args.dpi) if args.engine == "vllm" else 16)
    workers = args.render_workers or max(1, min(8, os.cpu_count() or 1))
    return RunConfig(
        inputs=inputs,
        input_root=root,
        output_dir=args.output_dir,
        mode=args.mode,
        engine=args.engine,
        dpi=args.dpi,
        max_pages=args.max_pages,
        batch_pages=batch,
        force=args.force,
        log_file=args.log_file,
        password=args.password or os.environ.get("PDF_PASSWORD") or None,
        render_workers=workers,
        render_timeout_s=args.render_timeout,
        render_memory_mb=args.render_memory_mb,
        max_page_pixels=args.max_page_pixels,
        blank_ink_threshold=args.blank_threshold,
        table_format=args.table_format,
        assets=args.assets,
        retry_temperatures=temps,
        retry_large=not args.no_large_pass,
        retry_large_cap=args.retry_large_cap,
        required_labels=_split(args.required_labels),
        roi_pass=args.roi_pass,
        roi_labels=_split(args.roi_labels),
        max_page_error_rate=args.max_page_error_rate,
        engine_restarts=args.engine_restarts,
        engine_stall_timeout_s=args.engine_stall_timeout,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        report=args.report,
        progress=args.progress,
        engine_config=ec,
    )


def gpu_memory_gib() -> float | None:
    """Total memory of the first visible NVIDIA GPU (nvidia-smi; no CUDA initialisation here)."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    env_ids = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    cmd = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    if env_ids:
        cmd += ["-i", env_ids]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
        return float(out.split()[0]) / 1024.0
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _apply_profile(ec: EngineConfig, run_gib: float | None = None) -> EngineConfig:
    from runner.launcher import gpu_peers
    from runner.profiles import (
        OUTSIDE_VLLM_GIB,
        BudgetError,
        allocator_cap_for,
        apply_profile,
        shared_gpu_allocator_cap,
        shared_gpu_utilization,
        vllm_utilization_for,
    )

    peers = gpu_peers()
    total = gpu_memory_gib() if (ec.profile != "default" or run_gib or peers > 1) else None
    if run_gib:
        if total is None:
            raise ConfigError("--gpu-memory-gib: no NVIDIA GPU found (nvidia-smi) to size the budget against")
        try:
            util, why = vllm_utilization_for(run_gib, total)
        except BudgetError as e:
            raise ConfigError(str(e)) from None
        log.info("profile: %s", why)
        cap, why = allocator_cap_for(run_gib)
        ec = dataclasses.replace(ec, gpu_memory_utilization=util, torch_memory_cap_gib=cap)
        log.info("profile: %s", why)
        usable: float | None = run_gib - OUTSIDE_VLLM_GIB  # exact (the share above is rounded)
    else:
        user_share = ec.gpu_memory_utilization != EngineConfig.gpu_memory_utilization
        if peers > 1 and total is not None and not user_share:
            try:
                util, why = shared_gpu_utilization(total, peers)
            except BudgetError as e:
                raise ConfigError(str(e)) from None
            ec = dataclasses.replace(ec, gpu_memory_utilization=util)
            log.info("profile: %s", why)
        usable = total * ec.gpu_memory_utilization if total is not None else None
        if peers > 1 and total is not None and ec.torch_memory_cap_gib is None:
            cap, why = shared_gpu_allocator_cap(total, ec.gpu_memory_utilization, peers)
            ec = dataclasses.replace(ec, torch_memory_cap_gib=cap)
            log.info("profile: %s", why)
    ec, reasons = apply_profile(ec, usable)
    for r in reasons:
        log.info("profile: %s", r)
    return ec


def setup_logging(log_file: str | None, quiet_console: bool = False) -> str:
    if not log_file:
        folder = Path("tmp_pdf_runs") / "logs"
        log_file = str(folder / time.strftime("run-%Y%m%d-%H%M%S.log"))
        with_pid = f"{log_file[:-4]}-{os.getpid()}.log"
        log_file = with_pid
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_runner", False):
            root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    fh = logging.FileHandler(log_file, encoding="utf-8")
    fh.setFormatter(fmt)
    fh._runner = True  # type: ignore[attr-defined]
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    sh.setLevel(logging.WARNING if quiet_console else logging.INFO)
    sh._runner = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    root.addHandler(sh)
    root.setLevel(logging.INFO)
    return log_file


def _redacted_argv(argv: list[str]) -> list[str]:
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a == "--password":
            out.append(a)
            hide = True
        elif a.startswith("--password="):
            out.append("--password=***")
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None, *, default_engine: str = "vllm") -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(default_engine)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return int(e.code or 0)
    if args.s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint_url
    if args.gpus and args.executor == "ray":
        print(
            "error: --gpus is the local launcher; with --executor ray use --ray-engine-actors",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if (args.engines_per_gpu != 1 or args.mps) and not args.gpus:
        opt = "--engines-per-gpu" if args.engines_per_gpu != 1 else "--mps"
        print(f"error: {opt} needs --gpus (the launcher starts the engines)", file=sys.stderr)
        return EXIT_USAGE
    if args.gpus:
        from runner.launcher import run_multi_gpu

        rest = [a for a in _strip_option(_strip_option(argv, "--gpus"), "--engines-per-gpu") if a != "--mps"]
        return run_multi_gpu(rest, args.gpus, engines_per_gpu=args.engines_per_gpu, mps=args.mps)
    from runner.launcher import apply_cpu_set, cap_torch_threads

    apply_cpu_set()  # a launcher worker with RUNNER_PIN_WORKERS=1: its own cores, before any child
    # Before torch is imported here or in the engine core. Not for the Ray driver: Ray gives its
    # workers and actors their own value (1 per CPU asked); with 4 exported Ray ran 25.3 pages/s
    # against 26.8 with its default on two H200s (GPU session 12).
    threads = cap_torch_threads() if args.executor != "ray" else None

    log_file = setup_logging(args.log_file, quiet_console=args.progress == "bar")
    log.info("command: %s", " ".join(_redacted_argv(argv)))
    if threads is not None:
        log.info(
            "OMP_NUM_THREADS=%s (unset: capped so the engine's pools leave the render workers room)", threads
        )
    try:
        root, rels = discover_inputs(args)
        cfg = config_from_args(args, tuple(rels), root)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    ray_options = None
    if args.executor == "ray":
        from runner.executors.ray_executor import options_from_args

        try:
            ray_options = options_from_args(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    # SIGTERM (the launcher stopping its workers, a spot instance going away, `timeout`) would
    # end Python at once: no ``finally``, so vLLM's engine-core process outlived its parent and
    # kept its GPU memory (GPU session 7: an orphaned engine core held 39 GiB and the next run on
    # that GPU failed at start-up). As an exception it closes the engine like Ctrl-C does; what
    # is written stays (each file is written whole), a rerun resumes from the done markers.
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(cfg, log_file, ray_options)
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        log.warning(
            "%s: the engine is closed, finished PDFs are written; a rerun resumes from the done markers",
            "terminated (SIGTERM)" if term else "interrupted",
        )
        return EXIT_TERMINATED if term else EXIT_INTERRUPTED
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _strip_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def run(cfg: RunConfig, log_file: str, ray_options: RayOptions | None = None) -> int:
    from runner.engines import EngineUnavailable, create_engine
    from runner.engines.base import EngineDied
    from runner.naming import docs_from_rels
    from runner.pipeline import Pipeline
    from runner.progress import Progress
    from runner.storage import open_storage
    from runner.summary import build_summary, dumps, print_summary, summary_name

    t0 = time.perf_counter()
    inputs = open_storage(cfg.input_root)
    outputs = open_storage(cfg.output_dir)
    docs = docs_from_rels(list(cfg.inputs))
    extra: dict[str, object] = {}
    if cfg.num_shards > 1:
        from runner.shard import ScanUnavailable, page_counts, select_shard, shard_balance

        try:
            counts = page_counts(inputs, [d.rel for d in docs], output_storage=outputs)
        except ScanUnavailable as e:  # no deterministic partition without page counts: stop
            log.error("cannot pick this shard's PDFs: %s", e)
            return EXIT_FAILED
        chosen = set(select_shard([d.rel for d in docs], counts, cfg.num_shards, cfg.shard_index))
        extra["shard_balance"] = shard_balance([d.rel for d in docs], counts, cfg.num_shards)
        docs = [d for d in docs if d.rel in chosen]
        log.info("shard %d of %d: %d PDF(s)", cfg.shard_index, cfg.num_shards, len(docs))
    if not docs:
        log.warning("no PDF found under %s", cfg.input_root)
    # Fail fast: an engine that cannot run here says so before any PDF is touched. With Ray the
    # engine runs in the cluster's actors (the driver may have no GPU, no vLLM); they report it.
    engine = None
    if ray_options is None:
        try:
            engine = create_engine(cfg)
        except EngineUnavailable as e:
            log.error("%s", e)  # to the console and the log file
            return EXIT_ENGINE
    progress = Progress(
        len(docs),
        cfg.progress if cfg.progress != "none" else "log",
        log_every_s=10.0 if cfg.progress != "none" else 1e9,
    )
    try:
        if ray_options is not None:
            from runner.executors.ray_executor import run_ray

            rr = run_ray(cfg, docs, inputs, outputs, progress, ray_options)
            results, stats = rr.results, rr.stats
            extra["executor"] = "ray"
            extra["ray"] = rr.summary
        else:
            pipe = Pipeline(cfg, create_engine, inputs, outputs, progress)
            results, stats = pipe.run(docs, engine=engine), pipe.stats
            extra["executor"] = "local"
    except EngineUnavailable as e:
        progress.close()
        log.error("%s", e)
        return EXIT_ENGINE
    except EngineDied as e:  # died while starting (e.g. out of GPU memory in the warm-up batch)
        progress.close()
        log.error("the engine did not start: %s; no page was processed, a rerun starts them", e)
        return EXIT_ENGINE
    finally:
        progress.close()
    wall = (
        time.perf_counter() - stats.t0
        if stats.engine_pages or stats.pages_done
        else (time.perf_counter() - t0)
    )
    extra["log_file"] = log_file
    summary = build_summary(cfg, results, stats, wall, extra)
    name = summary_name(cfg)
    outputs.write_bytes(name, dumps(summary))
    if cfg.report:
        from runner.report import render_run_dashboard

        outputs.write_bytes(
            name.replace("_run_summary", "_run").replace(".json", ".html"),
            render_run_dashboard(summary).encode("utf-8"),
        )
    if cfg.progress != "none":
        print_summary(summary, outputs.uri(name))
    failed = summary["files"].get("failed", 0)
    if ray_options is None and pipe.fatal_engine_error:
        return EXIT_ENGINE  # the engine died more often than --engine-restarts allows
    return EXIT_FAILED if failed else EXIT_OK


def main_entry() -> None:
    sys.exit(main())
