"""Engine stage on Ray: ``PageRequest`` → ``EngineOutput`` over a pool of engine actors.

``RayEngine`` implements the Engine protocol (``runner/engines/base.py``) for the scheduler on the
driver. Behind it, each actor owns one real engine built by ``engine_factory(config)`` (by default
``runner.engines.create_engine``), started once and reused for every document. An actor takes one
GPU (``num_gpus``) when the cluster has GPUs, else it is a CPU actor (tests).

1. ``submit`` only queues; ``poll`` hands queued requests to the ready actor with the fewest in
   flight (pages whose pixels stayed in the object store travel there as top-level ``ObjectRef``
   arguments, so they go from the render worker's node to the actor's node without the driver);
2. each busy actor has one outstanding ``poll`` call; ``poll`` waits on them and returns outputs;
3. an actor whose engine raised ``EngineDied`` restarts it in place and names the requests it lost;
   an actor that died (``RayActorError``: killed, node lost) is replaced by a new actor. Lost
   requests go back to the queue and to whichever actor is ready first; ``retried`` counts them.
   The driver keeps every request until its output arrives, so nothing is lost, and a request is
   in at most one actor at a time, so nothing is duplicated;
4. when every actor slot has used its ``max_restarts``, ``poll`` raises ``EngineDied`` and the
   scheduler's own restart budget applies (``restart`` brings up a fresh pool);
5. a submit call fails on its own only when a page's pixels were lost with the node that rendered
   them: its requests are resent one per call, and the page whose data is gone gets an error
   output (the scheduler re-renders it in the Large pass, or falls back to the text layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.config import RunConfig
from runner.engines.base import EngineDied, EngineUnavailable
from runner.executors.ray_render import HEAVY_KEY
from runner.records import EngineOutput, PageRequest

log = logging.getLogger(__name__)

_ACTOR_POLL_S = 0.05  # longest an actor's poll blocks: submits queue behind it
HEARTBEAT_S = 10.0  # the driver logs the pool's state this often while it has work
# Engine attributes the scheduler reads with getattr, and the defaults it assumes when absent.
_DESCRIBED = {
    "name": "engine",
    "needs_pixels": True,
    "needs_text_markdown": False,
    "worker_hook": None,
    "check_degenerate": True,
    "resolution": None,
    "large_resolution": None,
    "supports_request_resolution": False,  # vLLM with the plugin processor: Large pass reuses actors
}


# --------------------------------------------------------------------------------------------
# Actor side
# --------------------------------------------------------------------------------------------


class _EngineActor:
    """One real engine in one Ray actor process."""

    def __init__(self, config: RunConfig, engine_factory: Callable[[RunConfig], Any] | None) -> None:
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _actor_logging()
        if engine_factory is None:
            from runner.engines import create_engine

            engine_factory = create_engine
        self.engine = engine_factory(config)
        self.inflight: set[str] = set()

    def start(self) -> dict[str, Any]:
        self.engine.start()
        return self.describe()

    def describe(self) -> dict[str, Any]:
        import os

        info = {k: getattr(self.engine, k, v) for k, v in _DESCRIBED.items()}
        info["pid"] = os.getpid()
        return info

    def submit(self, requests: Sequence[PageRequest], *heavy: Any) -> None:
        """``heavy[i]`` (resolved by Ray from an ``ObjectRef``) belongs to the i-th request that
        has ``extra[HEAVY_KEY]`` set to True."""
        it = iter(heavy)
        reqs = []
        for r in requests:
            if r.image.extra.get(HEAVY_KEY):
                data = next(it)
                extra = {k: v for k, v in r.image.extra.items() if k != HEAVY_KEY}
                if data is not None:
                    pixels, hook = data
                    if hook is not None:
                        extra["hook"] = hook
                    r = dataclasses.replace(r, image=dataclasses.replace(r.image, pixels=pixels, extra=extra))
                else:
                    r = dataclasses.replace(r, image=dataclasses.replace(r.image, extra=extra))
            reqs.append(r)
        self.engine.submit(reqs)
        self.inflight.update(r.request_id for r in reqs)

    def poll(self, timeout: float) -> tuple[list[EngineOutput], list[str], str | None]:
        """(outputs, request ids lost to an engine death, the death's message)."""
        end = time.monotonic() + timeout
        outs: list[EngineOutput] = []
        try:
            while not outs and self.engine.pending() > 0:
                outs = self.engine.poll(timeout=max(0.0, min(0.02, end - time.monotonic())))
                if time.monotonic() >= end:
                    break
        except EngineDied as e:
            lost = sorted(self.inflight)
            self.inflight.clear()
            self.engine.restart()
            return [], lost, str(e) or type(e).__name__
        for o in outs:
            self.inflight.discard(o.request_id)
        return outs, [], None

    def close(self) -> None:
        self.engine.close()


def _actor_logging() -> None:
    """The project's INFO lines (the engine's heartbeat: steps, pending, add_ms) go to the actor's
    stderr, which Ray forwards to the driver prefixed with the actor's pid; without this an actor
    logs only warnings and the GPU runs cannot be compared with the local executor's."""
    lg = logging.getLogger("runner")
    if not any(getattr(h, "_runner_actor", False) for h in lg.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._runner_actor = True  # type: ignore[attr-defined]
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


_ACTOR_CLS: list[Any] = []


def _actor_cls() -> Any:
    if not _ACTOR_CLS:
        import ray

        _ACTOR_CLS.append(ray.remote(max_restarts=0, max_task_retries=0)(_EngineActor))
    return _ACTOR_CLS[0]


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    actor: Any = None
    ready: bool = False
    start_ref: Any = None
    poll_ref: Any = None
    inflight: set[str] = field(default_factory=set)
    submits: dict[Any, list[str]] = field(default_factory=dict)  # submit call -> its request ids
    sent_at: dict[Any, float] = field(default_factory=dict)  # submit or poll call -> when it was made
    restarts: int = 0
    retired: bool = False
    pid: int = 0


@dataclass
class _Beat:
    """What the driver saw of its actor calls since the last heartbeat line: a submit call's round
    trip includes its wait behind the actor's poll and the fetch of its pages' data."""

    last: float = field(default_factory=time.monotonic)
    answered: int = 0  # outputs since the pool started (carried over)
    submits: int = 0
    submitted: int = 0
    submit_s: float = 0.0
    submit_max_s: float = 0.0
    polls: int = 0
    poll_s: float = 0.0

    def took(self, sent: float | None, requests: int | None = None) -> None:
        if sent is None:
            return
        dt = time.monotonic() - sent
        if requests is None:
            self.polls += 1
            self.poll_s += dt
        else:
            self.submits += 1
            self.submitted += requests
            self.submit_s += dt
            self.submit_max_s = max(self.submit_max_s, dt)


class RayEngine:
    """Engine protocol over a pool of Ray engine actors (see the module docstring)."""

    def __init__(
        self,
        config: RunConfig,
        engine_factory: Callable[[RunConfig], Any] | None = None,
        num_actors: int = 1,
        num_gpus: float = 0.0,
        num_cpus: float = 1.0,
        max_restarts: int = 2,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        if num_actors < 1:
            raise ValueError("RayEngine needs at least one actor")
        self.config = config
        self.engine_factory = engine_factory
        self.num_actors = num_actors
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.max_restarts = max_restarts
        self.actor_options = dict(actor_options or {})
        # Mirrors of the actors' engine, read by the scheduler; filled in by ``start``.
        self.name: str = config.engine
        self.needs_pixels: bool = True
        self.needs_text_markdown: bool = False
        self.worker_hook: tuple[str, dict[str, Any]] | None = None
        self.check_degenerate: bool = True
        self.resolution: str | None = None
        self.large_resolution: str | None = None
        # counters for the run summary
        self.retried = 0  # requests resent after their actor or its engine was lost
        self.actor_restarts = 0  # actors replaced after they died
        self.engine_deaths = 0  # engines restarted inside a live actor (EngineDied)
        self.max_pending = 0
        self._slots: list[_Slot] = []
        self._queue: deque[PageRequest] = deque()
        self._requests: dict[str, tuple[PageRequest, int | None]] = {}  # id -> (request, slot index)
        self._alone: set[str] = set()  # requests of a failed submit batch: resent one per call
        self._beat = _Beat()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        import ray

        self._slots = [self._spawn(_Slot(i)) for i in range(self.num_actors)]
        try:
            infos = ray.get([s.start_ref for s in self._slots])
        except ray.exceptions.RayTaskError as e:
            self._kill_all()
            cause = e.cause
            if isinstance(cause, EngineUnavailable):
                raise EngineUnavailable(str(cause)) from None
            raise
        for s, info in zip(self._slots, infos, strict=True):
            s.ready, s.start_ref, s.pid = True, None, int(info.pop("pid", 0))
        for k, v in infos[0].items():
            setattr(self, k, v)
        log.info(
            "Ray engine pool: %d actor(s) of %s (%g GPU each)", self.num_actors, self.name, self.num_gpus
        )

    def _spawn(self, slot: _Slot) -> _Slot:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, **self.actor_options}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        slot.actor = _actor_cls().options(**opts).remote(self.config, self.engine_factory)
        slot.start_ref = slot.actor.start.remote()
        slot.ready, slot.poll_ref, slot.inflight, slot.submits, slot.sent_at = False, None, set(), {}, {}
        return slot

    def restart(self) -> None:
        """After ``EngineDied`` from ``poll``: drop everything and bring up a fresh pool (the
        scheduler resends what it had in flight)."""
        self._kill_all()
        self._queue.clear()
        self._requests.clear()
        self.start()

    def close(self) -> None:
        import ray

        refs = [s.actor.close.remote() for s in self._slots if s.actor is not None and s.ready]
        with contextlib.suppress(ray.exceptions.RayError):
            ray.wait(refs, num_returns=len(refs), timeout=30)
        self._kill_all()
        self._queue.clear()
        self._requests.clear()

    def _kill_all(self) -> None:
        import ray

        for s in self._slots:
            if s.actor is not None:
                with contextlib.suppress(ray.exceptions.RayError, ValueError):
                    ray.kill(s.actor, no_restart=True)
            s.actor, s.ready, s.poll_ref, s.start_ref = None, False, None, None
        self._slots = []

    # -- protocol -------------------------------------------------------------------------------
    def submit(self, requests: Sequence[PageRequest]) -> None:
        for r in requests:
            self._requests[r.request_id] = (r, None)
            self._queue.append(r)
        self.max_pending = max(self.max_pending, len(self._requests))

    def pending(self) -> int:
        return len(self._requests)

    def actors(self) -> list[Any]:
        """Handles of the live actors (fault-injection tests)."""
        return [s.actor for s in self._slots if s.actor is not None and s.ready]

    def poll(self, timeout: float = 0.0) -> list[EngineOutput]:
        import ray

        self._flush()
        for s in self._slots:
            if s.ready and s.inflight and s.poll_ref is None:
                s.poll_ref = s.actor.poll.remote(_ACTOR_POLL_S)
                s.sent_at[s.poll_ref] = time.monotonic()
        waits = {s.poll_ref: s for s in self._slots if s.poll_ref is not None}
        waits.update({s.start_ref: s for s in self._slots if s.start_ref is not None})
        waits.update({ref: s for s in self._slots for ref in s.submits})
        if not waits:
            if timeout > 0:
                time.sleep(min(timeout, 0.01))
            return []
        refs = list(waits)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        outs: list[EngineOutput] = []
        for ref in ready:
            s = waits[ref]
            if ref is s.start_ref:
                self._on_started(s)
            elif ref in s.submits:
                outs.extend(self._on_submitted(s, ref))
            elif ref is s.poll_ref:
                outs.extend(self._on_polled(s))
        self._flush()
        self._beat.answered += len(outs)
        self._heartbeat()
        return outs

    def _heartbeat(self) -> None:
        now = time.monotonic()
        b = self._beat
        if now - b.last < HEARTBEAT_S:
            return
        log.info(
            "ray engine: queued=%d in_actors=%s answered=%d | submit calls %d, %.1f requests each, "
            "round trip mean %.1f ms max %.1f ms | polls %d, round trip mean %.1f ms",
            len(self._queue),
            [len(s.inflight) for s in self._slots],
            b.answered,
            b.submits,
            b.submitted / b.submits if b.submits else 0.0,
            1000 * b.submit_s / b.submits if b.submits else 0.0,
            1000 * b.submit_max_s,
            b.polls,
            1000 * b.poll_s / b.polls if b.polls else 0.0,
        )
        self._beat = _Beat(last=now, answered=b.answered)

    # -- internals ------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Hand queued requests to ready actors, fewest in flight first."""
        ready = [s for s in self._slots if s.ready]
        if not self._queue or not ready:
            return
        batches: dict[int, list[PageRequest]] = {}
        load = {s.index: len(s.inflight) for s in ready}
        while self._queue:
            r = self._queue.popleft()
            if r.request_id not in self._requests:
                continue
            i = min(load, key=lambda k: load[k])
            load[i] += 1
            batches.setdefault(i, []).append(r)
        for s in ready:
            batch = batches.get(s.index)
            if not batch:
                continue
            groups = [[r] for r in batch if r.request_id in self._alone]
            rest = [r for r in batch if r.request_id not in self._alone]
            for group in ([rest] if rest else []) + groups:
                self._send(s, group)

    def _send(self, s: _Slot, batch: list[PageRequest]) -> None:
        sent, heavy = [], []
        for r in batch:
            ref = r.image.extra.get(HEAVY_KEY)
            if ref is not None:
                heavy.append(ref)
                extra = {**r.image.extra, HEAVY_KEY: True}  # a flag; the data is a top-level arg
                r = dataclasses.replace(r, image=dataclasses.replace(r.image, extra=extra))
            sent.append(r)
        ref = s.actor.submit.remote(sent, *heavy)
        s.submits[ref] = [r.request_id for r in batch]
        s.sent_at[ref] = time.monotonic()
        for r in batch:
            s.inflight.add(r.request_id)
            self._requests[r.request_id] = (r, s.index)

    def _on_started(self, s: _Slot) -> None:
        import ray

        try:
            info = ray.get(s.start_ref)
        except ray.exceptions.RayError as e:
            s.start_ref = None
            self._lost(s, f"replacement actor failed to start: {e}")
            return
        s.start_ref, s.ready, s.pid = None, True, int(info.get("pid", 0))
        log.info("engine actor %d ready again (pid %d)", s.index, s.pid)

    def _on_submitted(self, s: _Slot, ref: Any) -> list[EngineOutput]:
        """A submit call finished. It fails alone when a page's pixels were lost with the node that
        rendered them: those pages get an error output (the scheduler falls back or re-renders them
        in the Large pass) instead of waiting forever."""
        import ray

        ids = s.submits.pop(ref)
        self._beat.took(s.sent_at.pop(ref, None), len(ids))
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            return []  # the actor is gone; its poll reports it and the requests are resent
        except ray.exceptions.RayError as e:
            if len(ids) > 1:  # find the page(s) at fault: resend each request alone
                self._alone.update(ids)
                self._requeue(s, ids)
                return []
            log.error("engine actor %d could not take %d request(s): %s", s.index, len(ids), type(e).__name__)
            outs = []
            for rid in ids:
                s.inflight.discard(rid)
                self._alone.discard(rid)
                if self._requests.pop(rid, None) is not None:
                    outs.append(
                        EngineOutput(
                            rid,
                            "",
                            finish_reason="error",
                            error=f"page data lost before generation ({type(e).__name__})",
                        )
                    )
            return outs
        return []

    def _on_polled(self, s: _Slot) -> list[EngineOutput]:
        import ray

        ref, s.poll_ref = s.poll_ref, None
        self._beat.took(s.sent_at.pop(ref, None))
        try:
            outs, lost, died = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._lost(s, f"engine actor died: {type(e).__name__}")
            return []
        except ray.exceptions.RayTaskError as e:  # a bug in the actor's poll: treat the actor as lost
            self._lost(s, f"engine actor failed: {e}")
            return []
        good = []
        for o in outs:
            s.inflight.discard(o.request_id)
            self._alone.discard(o.request_id)
            if self._requests.pop(o.request_id, None) is not None:
                good.append(o)
        if died is not None:
            self.engine_deaths += 1
            log.error("engine in actor %d died (%s); resending %d request(s)", s.index, died, len(lost))
            self._requeue(s, [i for i in lost if i in s.inflight])
            s.restarts += 1
            if s.restarts > self.max_restarts:
                self._retire(s)
        return good

    def _requeue(self, s: _Slot, ids: list[str]) -> None:
        for rid in ids:
            s.inflight.discard(rid)
            item = self._requests.get(rid)
            if item is not None:
                self._requests[rid] = (item[0], None)
                self._queue.append(item[0])
                self.retried += 1

    def _lost(self, s: _Slot, why: str) -> None:
        """The actor is gone: resend its requests elsewhere and replace it within its budget."""
        import ray

        n = len(s.inflight)
        self._requeue(s, sorted(s.inflight))
        with contextlib.suppress(ray.exceptions.RayError, ValueError):
            ray.kill(s.actor, no_restart=True)
        s.actor, s.ready = None, False
        s.restarts += 1
        log.error("engine actor %d lost (%s); resending %d request(s)", s.index, why, n)
        if s.restarts > self.max_restarts:
            self._retire(s)
        else:
            self.actor_restarts += 1
            self._spawn(s)
        if all(x.retired for x in self._slots):
            raise EngineDied(f"all {len(self._slots)} engine actor(s) lost; last: {why}")

    def _retire(self, s: _Slot) -> None:
        import ray

        log.error("engine actor slot %d retired after %d restart(s)", s.index, s.restarts - 1)
        self._requeue(s, sorted(s.inflight))
        if s.actor is not None:
            with contextlib.suppress(ray.exceptions.RayError, ValueError):
                ray.kill(s.actor, no_restart=True)
        s.actor, s.ready, s.retired, s.submits, s.poll_ref, s.start_ref = None, False, True, {}, None, None
        s.sent_at = {}
        if all(x.retired for x in self._slots):
            raise EngineDied(f"all {len(self._slots)} engine actor(s) exhausted their restarts")

    def stats(self) -> dict[str, int]:
        return {
            "actor_restarts": self.actor_restarts,
            "engine_deaths": self.engine_deaths,
            "requests_retried": self.retried,
        }
