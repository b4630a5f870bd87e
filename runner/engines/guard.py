"""Repetition guard (engine stage): a batch-level no-repeat n-gram ban, vectorised with numpy.

Semantics are upstream's (``vllm/model_executor/models/deepseek_ocr.py``,
``NoRepeatNGramLogitsProcessor``): once a request has produced ``L >= n`` tokens, every token that
would complete an n-gram already present among the last ``window`` output tokens is banned (its
logit set to -inf), except whitelisted tokens (the table tags). Upstream runs that check per
request in Python on every step, which cost 17-41% of decode throughput at batch 128-256 (see
``../shared/gpu/README.md``). Here each request keeps a rolling numpy history of its last
``window`` tokens, updated incrementally, and the whole batch is checked with one vectorised
comparison; logits are touched only when something is banned.

In: vLLM v1 ``BatchUpdate`` events (added/removed/moved rows, with references to each request's
growing output-token list) and the logits tensor of a step. Out: the same logits with banned
entries at -inf. ``GuardState`` is framework-free (numpy only); the vLLM ``LogitsProcessor``
wrapper lives in ``runner/vllm_plugin/guard_processor.py`` so that importing this module never
imports vLLM or torch.

Per-request settings travel in ``SamplingParams.extra_args`` under upstream's keys
(``ngram_size``, ``window_size``, ``whitelist_token_ids``), so the same request can be run
through either implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NGRAM_KEY = "ngram_size"
WINDOW_KEY = "window_size"
WHITELIST_KEY = "whitelist_token_ids"
UPSTREAM_DEFAULT_WINDOW = 100  # upstream's default when ``window_size`` is absent


@dataclass(frozen=True)
class GuardParams:
    """One request's guard settings."""

    ngram_size: int
    window: int
    whitelist: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.ngram_size < 1 or self.window < 1:
            raise ValueError(f"ngram_size and window must be >= 1, got {self.ngram_size}, {self.window}")

    def extra_args(self) -> dict[str, Any]:
        """The ``SamplingParams.extra_args`` entries that select these settings."""
        return {NGRAM_KEY: self.ngram_size, WINDOW_KEY: self.window, WHITELIST_KEY: list(self.whitelist)}

    @classmethod
    def from_extra_args(cls, extra: Mapping[str, Any] | None) -> GuardParams | None:
        """Parse upstream's keys; ``None`` when the request does not ask for the guard."""
        if not extra or extra.get(NGRAM_KEY) is None:
            return None
        n = extra[NGRAM_KEY]
        w = extra.get(WINDOW_KEY, UPSTREAM_DEFAULT_WINDOW)
        if not isinstance(n, int) or n <= 0 or not isinstance(w, int) or w <= 0:
            raise ValueError(f"{NGRAM_KEY} and {WINDOW_KEY} must be positive integers, got {n!r}, {w!r}")
        wl = extra.get(WHITELIST_KEY) or ()
        return cls(n, w, tuple(sorted({int(t) for t in wl})))


def reference_banned(output_ids: Sequence[int], params: GuardParams) -> set[int]:
    """Upstream's algorithm, written plainly: the tokens banned for the next step."""
    n, w = params.ngram_size, params.window
    if len(output_ids) < n or n == 1:
        # n == 1: upstream slices ``output_ids[-(n - 1):]`` == the whole list, so it never bans
        # anything; kept identical on purpose (a 1-gram ban would forbid every recent token).
        return set()
    prefix = tuple(output_ids[len(output_ids) - (n - 1) :])
    start = max(0, len(output_ids) - w)
    end = len(output_ids) - n + 1
    banned = set()
    for i in range(start, end):
        gram = tuple(output_ids[i : i + n])
        if gram[:-1] == prefix:
            banned.add(gram[-1])
    return banned - set(params.whitelist)


_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by its powers is a bijection mod 2**64


class _Pool:
    """History slots of every request sharing one ``GuardParams``: a (capacity, window) array,
    -1 padded on the left, newest token last. A slot stays with its request when vLLM moves it."""

    def __init__(self, params: GuardParams) -> None:
        self.params = params
        self.hist = np.full((8, params.window), -1, dtype=np.int64)
        self.free = list(range(7, -1, -1))
        w = params.window
        self.powers = np.cumprod(np.full(w + 1, _HASH_BASE, dtype=np.uint64), dtype=np.uint64)
        self.powers = np.concatenate([np.ones(1, dtype=np.uint64), self.powers[:-1]])  # R**0 .. R**w

    def take(self) -> int:
        if not self.free:
            cap = self.hist.shape[0]
            grown = np.full((cap * 2, self.params.window), -1, dtype=np.int64)
            grown[:cap] = self.hist
            self.hist = grown
            self.free = list(range(cap * 2 - 1, cap - 1, -1))
        slot = self.free.pop()
        self.hist[slot] = -1
        return slot

    def give(self, slot: int) -> None:
        self.free.append(slot)


class _Row:
    """One request: its output-token list (a reference into vLLM), pool slot and counters.
    Shared by the host (numpy) and device (torch) guard states; ``pool`` is theirs."""

    __slots__ = ("length", "out", "pool", "seen", "slot")

    def __init__(self, pool: Any, out: list[int]) -> None:
        self.pool = pool
        self.slot = pool.take()
        self.out = out
        self.seen = 0  # entries of ``out`` folded into the history
        self.length = 0  # real tokens seen in total

    def new_end(self) -> int:
        """End of the real tokens in ``out``: async scheduling appends -1 placeholders that vLLM
        repairs only right before sampling, so they are not history yet."""
        out, end = self.out, len(self.out)
        while end > self.seen and out[end - 1] < 0:
            end -= 1
        return end


@dataclass
class StepWork:
    """What one step must do to each pool's histories, from ``BatchRows.advance``."""

    #: one new token per row (the common case): slots and their new token, one shift per pool
    shift: dict[Any, tuple[list[int], list[int]]]
    #: several new tokens (first sync, or more than one new token): (slot, last <= window tokens)
    full: dict[Any, list[tuple[int, list[int]]]]
    #: rows with at least n tokens, to check: batch indices and their slots
    ready: dict[Any, tuple[list[int], list[int]]]


def _banned_for_group(
    hist: np.ndarray, params: GuardParams, powers: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised check for rows sharing ``params`` (each row has >= n real tokens).

    Returns (row positions, banned tokens). Candidate windows are found with a polynomial hash
    over prefix sums (a few passes over the (rows, window) array instead of a rows x window x n
    comparison), then verified exactly, so hash collisions cannot ban anything.
    """
    n, w = params.ngram_size, params.window
    empty = np.empty(0, np.int64)
    if n > w or n == 1:  # no n-gram fits in the window; n == 1 bans nothing upstream either
        return empty, empty
    if powers is None:
        powers = np.concatenate(
            [
                np.ones(1, dtype=np.uint64),
                np.cumprod(np.full(w, _HASH_BASE, dtype=np.uint64), dtype=np.uint64),
            ]
        )
    m, s = n - 1, w - n + 1  # prefix length; number of candidate windows (= start of the prefix)
    x = (hist.astype(np.uint64) + np.uint64(1)) * powers[:w]  # pads (-1) weigh 0
    csum = np.zeros((hist.shape[0], w + 1), dtype=np.uint64)
    np.cumsum(x, axis=1, out=csum[:, 1:])
    seg = csum[:, m : m + s] - csum[:, :s]  # window j, scaled by R**j
    target = csum[:, w] - csum[:, s]  # the prefix, scaled by R**s
    cand = seg * powers[s:0:-1] == target[:, None]
    rows, cols = np.nonzero(cand)
    if rows.size == 0:
        return empty, empty
    idx = cols[:, None] + np.arange(m)
    exact = (hist[rows[:, None], idx] == hist[rows, s:]).all(axis=1)
    rows, cols = rows[exact], cols[exact]
    toks = hist[rows, cols + m]
    keep = toks >= 0
    if params.whitelist:
        keep &= ~np.isin(toks, np.asarray(params.whitelist, dtype=np.int64))
    rows, toks = rows[keep], toks[keep]
    if rows.size == 0:
        return empty, empty
    # One entry per (row, token): banning twice is harmless but wastes a scatter.
    key = np.unique(rows.astype(np.int64) * (1 << 32) + toks)
    return key >> 32, key & 0xFFFFFFFF


class BatchRows:
    """Which request is in which persistent-batch row: vLLM's batch events, for both guard
    states (host and device). Subclasses make the pools (``_new_pool``)."""

    def __init__(self) -> None:
        self.rows: dict[int, _Row] = {}
        self.pools: dict[GuardParams, Any] = {}

    def _new_pool(self, params: GuardParams) -> Any:
        raise NotImplementedError

    # -- batch bookkeeping (vLLM's order: removed, added, moved) ---------------------------------
    def update(
        self,
        removed: Iterable[int],
        added: Iterable[tuple[int, Mapping[str, Any] | None, list[int]]],
        moved: Iterable[tuple[int, int, bool]],
    ) -> None:
        """Apply one batch update. ``added`` holds (index, extra_args, output-token list);
        ``moved`` holds (a, b, swap): a one-way move a->b when ``swap`` is false."""
        rows = self.rows
        for index in removed:
            self._drop(index)
        for index, extra, out in added:
            self._drop(index)
            params = GuardParams.from_extra_args(extra)
            if params is not None:
                pool = self.pools.get(params)
                if pool is None:
                    pool = self.pools[params] = self._new_pool(params)
                rows[index] = _Row(pool, out)
        for a, b, swap in moved:
            ra, rb = rows.pop(a, None), rows.pop(b, None)
            if ra is not None:
                rows[b] = ra
            if rb is not None:
                if swap:
                    rows[a] = rb
                else:  # a one-way move overwrites b
                    rb.pool.give(rb.slot)

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            row.pool.give(row.slot)

    def advance(self) -> StepWork:
        """Move every row past the tokens it gained since the last step; say what to fold in."""
        work = StepWork({}, {}, {})
        for index, row in self.rows.items():
            end = row.new_end()
            if end == row.seen + 1:
                slots, toks = work.shift.setdefault(row.pool, ([], []))
                slots.append(row.slot)
                toks.append(row.out[end - 1])
            elif end > row.seen:
                w = row.pool.params.window
                work.full.setdefault(row.pool, []).append((row.slot, row.out[max(row.seen, end - w) : end]))
            row.length += end - row.seen
            row.seen = end
            if row.length >= row.pool.params.ngram_size:
                idx, slots2 = work.ready.setdefault(row.pool, ([], []))
                idx.append(index)
                slots2.append(row.slot)
        return work


class GuardState(BatchRows):
    """The guard on the host: numpy histories, one vectorised check per pool and step."""

    def _new_pool(self, params: GuardParams) -> _Pool:
        return _Pool(params)

    # -- the per-step check ----------------------------------------------------------------------
    def banned(self) -> tuple[np.ndarray, np.ndarray]:
        """Sync every row with its output list and return (batch indices, banned token ids)."""
        empty = np.empty(0, np.int64)
        if not self.rows:
            return empty, empty
        # 1) fold new tokens in: one token per row per step is the common case, done in one
        #    vectorised shift per pool; anything else (first sync, several tokens) row by row.
        work = self.advance()
        for pool, (slots, toks) in work.shift.items():
            sl = np.asarray(slots, dtype=np.int64)
            h = pool.hist
            h[sl, :-1] = h[sl, 1:]
            h[sl, -1] = toks
        for pool, rows in work.full.items():
            for slot, new in rows:
                hist = pool.hist[slot]
                m = len(new)  # at most the window
                if m < hist.shape[0]:
                    hist[:-m] = hist[m:]
                hist[-m:] = new
        # 2) one vectorised check per pool
        out_rows: list[np.ndarray] = []
        out_toks: list[np.ndarray] = []
        for pool, (idx, slots) in work.ready.items():
            pos, toks_b = _banned_for_group(
                pool.hist[np.asarray(slots, dtype=np.int64)], pool.params, pool.powers
            )
            if pos.size:
                out_rows.append(np.asarray(idx, dtype=np.int64)[pos])
                out_toks.append(toks_b)
        if not out_rows:
            return empty, empty
        return np.concatenate(out_rows), np.concatenate(out_toks)


def apply_bans(
    logits: Any, rows: np.ndarray, toks: np.ndarray, *, pin_memory: bool = False, neg_inf: Any = None
) -> Any:
    """Set ``logits[rows, toks] = -inf`` in place (torch tensor on any device); returns ``logits``.

    Nothing here may wait for the GPU: the indices go up from pinned memory without blocking and
    ``neg_inf`` should be a scalar tensor already on the device. A ``torch.tensor(..., device=cuda)``
    made per step is a pageable copy that synchronises the stream; measured on an H100 it cost 60%
    of decode throughput by stopping the host from running ahead of the GPU.
    """
    if rows.size == 0:
        return logits
    import torch

    idx = torch.from_numpy(np.stack([rows, toks]))
    if pin_memory and logits.is_cuda:
        idx = idx.pin_memory()
    idx = idx.to(logits.device, non_blocking=True)
    if neg_inf is None:
        neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    logits.index_put_((idx[0], idx[1]), neg_inf)
    return logits
