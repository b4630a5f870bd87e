"""Executor ``ray``: the local pipeline's scheduler on the driver, its work on a Ray cluster.

In: the same ``RunConfig``, documents and storages as the local executor, plus ``RayOptions``.
Out: the same ``DocResult`` list and ``RunStats`` (so the same files, records, statuses and done
markers: ``runner.pipeline.Pipeline`` writes them in both cases), and a ``ray`` block for the run
summary saying what was retried.

``Pipeline`` stays the single place that decides statuses, retries, records and writing. Ray only
replaces the two places where work leaves the driver: rendering (``RayRenderPool``, Ray tasks on
CPU workers) and generation (``RayEngine``, one engine actor per GPU, reused across documents).
Input and output storage stay on the driver: workers need no S3 credentials, and documents reach
other nodes through Ray's object store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from runner.config import RunConfig
from runner.executors.ray_engine import RayEngine
from runner.executors.ray_render import RayRenderPool
from runner.naming import InputDoc
from runner.pipeline import Pipeline, RunStats
from runner.progress import Progress
from runner.records import DocResult
from runner.storage import Storage

log = logging.getLogger("runner")

_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RayOptions:
    """How to use the cluster. ``None`` fields are derived from the cluster's resources."""

    address: str | None = None  # None: join the local cluster started by `ray start`, else start one
    engine_actors: int | None = None  # None: one per GPU of the cluster, or 1 CPU actor without GPUs
    gpus_per_actor: float | None = None  # None: tensor_parallel_size when the cluster has GPUs, else 0
    render_tasks: int | None = None  # render tasks in flight; None: cluster CPUs minus engine actors
    task_retries: int = 2  # resubmissions of a render task whose worker died
    actor_restarts: int | None = None  # replacements per engine actor slot; None: cfg.engine_restarts
    pixels_in_store: bool | None = None  # None: yes unless the driver needs pixels (assets, report)
    ship_code: bool | None = None  # upload runner/ and postprocess/ (py_modules); None: remote address
    extra_pythonpath: tuple[str, ...] = ()  # prepended to workers' PYTHONPATH (local clusters, tests)
    include_dashboard: bool | None = None
    render_task_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"resources": {...}}
    engine_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("engine_actors", "render_tasks"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--ray-{name.replace('_', '-')} must be >= 1")
        if self.task_retries < 0:
            raise ValueError("render task retries must be >= 0")


@dataclass(frozen=True)
class RayRunResult:
    results: list[DocResult]
    stats: RunStats
    summary: dict[str, Any]  # the run summary's "ray" block


def init_ray(options: RayOptions) -> bool:
    """Connect to (or start) the cluster unless already connected; True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    paths = [*options.extra_pythonpath, str(_REPO)]
    env_vars = {
        "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TOKENIZERS_PARALLELISM": "false",
    }
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    remote = options.address not in (None, "local") and not str(options.address).startswith("127.")
    if options.ship_code if options.ship_code is not None else remote:
        import postprocess
        import runner

        runtime_env["py_modules"] = [os.path.dirname(runner.__file__), os.path.dirname(postprocess.__file__)]
        env_vars.pop("PYTHONPATH")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
    if options.include_dashboard is not None:
        kwargs["include_dashboard"] = options.include_dashboard
    ray.init(address=options.address, **kwargs)
    return True


def plan(cfg: RunConfig, options: RayOptions) -> tuple[int, float, int]:
    """(engine actors, GPUs per actor, render tasks) for the connected cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    if options.gpus_per_actor is not None:
        per = options.gpus_per_actor
    else:
        per = float(cfg.engine_config.tensor_parallel_size) if gpus >= 1 and cfg.engine != "text" else 0.0
    actors = options.engine_actors or (max(1, int(gpus // per)) if per else 1)
    render = options.render_tasks or max(1, int(cpus) - actors)
    return actors, per, render


class _EngineFactory:
    """``Pipeline``'s engine factory: a ``RayEngine`` per call (main phase, Large phase), all kept
    so their counters reach the summary."""

    def __init__(
        self,
        inner: Callable[[RunConfig], Any] | None,
        actors: int,
        gpus: float,
        restarts: int,
        actor_options: dict[str, Any],
    ) -> None:
        self.inner, self.actors, self.gpus, self.restarts = inner, actors, gpus, restarts
        self.actor_options = actor_options
        self.engines: list[RayEngine] = []

    def __call__(self, config: RunConfig) -> RayEngine:
        eng = RayEngine(
            config,
            self.inner,
            num_actors=self.actors,
            num_gpus=self.gpus,
            max_restarts=self.restarts,
            actor_options=self.actor_options,
        )
        self.engines.append(eng)
        return eng


def make_pipeline(
    cfg: RunConfig,
    inputs: Storage,
    outputs: Storage,
    progress: Progress,
    options: RayOptions,
    engine_factory: Callable[[RunConfig], Any] | None = None,
) -> tuple[Pipeline, _EngineFactory, list[RayRenderPool]]:
    """A ``Pipeline`` wired to Ray (the caller must be connected: ``init_ray``)."""
    actors, per_gpu, render = plan(cfg, options)
    restarts = options.actor_restarts if options.actor_restarts is not None else cfg.engine_restarts
    factory = _EngineFactory(engine_factory, actors, per_gpu, restarts, dict(options.engine_actor_options))
    in_store = options.pixels_in_store
    if in_store is None:
        in_store = cfg.assets == "none" and not cfg.report
    pools: list[RayRenderPool] = []

    def pool_factory(c: RunConfig) -> RayRenderPool:
        pool = RayRenderPool(
            workers=render,
            render_timeout_s=c.render_timeout_s,
            open_timeout_s=c.open_timeout_s,
            mem_limit_mb=c.render_memory_mb,
            max_retries=options.task_retries,
            pixels_in_store=bool(in_store),
            task_options=dict(options.render_task_options),
        )
        pools.append(pool)
        return pool

    log.info(
        "Ray executor: %d engine actor(s) (%g GPU each), %d render task(s) in flight", actors, per_gpu, render
    )
    # Pipeline's annotations name the local classes; the Ray ones implement the same interfaces.
    pipe = Pipeline(cfg, cast(Any, factory), inputs, outputs, progress, pool_factory=cast(Any, pool_factory))
    return pipe, factory, pools


def with_absolute_model_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a local ``--model`` folder and ``--cache-dir`` made absolute: engine actors do
    not necessarily share the driver's working directory, and a relative folder would then read as
    a hub id there. Hub ids and absent paths are left as given."""
    ec = cfg.engine_config
    model = str(Path(ec.model).expanduser().resolve()) if Path(ec.model).expanduser().is_dir() else ec.model
    cache = str(Path(ec.cache_dir).expanduser().resolve()) if ec.cache_dir else ec.cache_dir
    if (model, cache) == (ec.model, ec.cache_dir):
        return cfg
    return replace(cfg, engine_config=replace(ec, model=model, cache_dir=cache))


def run_ray(
    cfg: RunConfig,
    docs: list[InputDoc],
    inputs: Storage,
    outputs: Storage,
    progress: Progress,
    options: RayOptions | None = None,
    engine_factory: Callable[[RunConfig], Any] | None = None,
) -> RayRunResult:
    """Run ``docs`` on Ray; connects (and afterwards disconnects) unless already connected.

    ``engine_factory`` builds the real engine inside each actor (default
    ``runner.engines.create_engine``); it is pickled to the actors, so it must be importable there.
    """
    import ray

    options = options or RayOptions()
    cfg = with_absolute_model_paths(cfg)
    connected = init_ray(options)
    try:
        pipe, factory, pools = make_pipeline(cfg, inputs, outputs, progress, options, engine_factory)
        results = pipe.run(docs, engine=cast(Any, factory(cfg)))
        return RayRunResult(results, pipe.stats, ray_summary(factory, pools))
    finally:
        if connected:
            ray.shutdown()


def ray_summary(factory: _EngineFactory, pools: list[RayRenderPool]) -> dict[str, Any]:
    """The run summary's ``ray`` block: what ran where and what was retried."""
    return {
        "engine_actors": factory.actors,
        "gpus_per_actor": factory.gpus,
        "render_tasks": pools[0].workers if pools else 0,
        "engine_actor_restarts": sum(e.actor_restarts for e in factory.engines),
        "engine_deaths_in_actor": sum(e.engine_deaths for e in factory.engines),
        "engine_requests_retried": sum(e.retried for e in factory.engines),
        "render_tasks_retried": sum(p.retried for p in pools),
        "render_worker_restarts": sum(p.restarts for p in pools),
        "max_render_tasks_in_ray": max((p.max_in_ray for p in pools), default=0),
        "max_engine_pending": max((e.max_pending for e in factory.engines), default=0),
    }


def add_ray_arguments(parser: Any) -> None:
    """The CLI's ``--executor`` and ``--ray-*`` options (an ``argparse`` parser or group)."""
    g = parser.add_argument_group("executor (ray)") if hasattr(parser, "add_argument_group") else parser
    g.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (--gpus for several GPUs); ray: a Ray cluster",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster address (ray://host:10001 or host:6379); default: join the cluster "
        "started on this machine by `ray start`, else start a local one",
    )
    g.add_argument(
        "--ray-engine-actors",
        type=int,
        default=None,
        help="engine actors; default one per GPU in the cluster (1 CPU actor without GPUs)",
    )
    g.add_argument(
        "--ray-render-tasks",
        type=int,
        default=None,
        help="render tasks in flight; default the cluster's CPUs minus the engine actors",
    )


def options_from_args(args: Any) -> RayOptions:
    """``RayOptions`` from parsed CLI arguments (see ``add_ray_arguments``)."""
    return RayOptions(
        address=args.ray_address, engine_actors=args.ray_engine_actors, render_tasks=args.ray_render_tasks
    )
