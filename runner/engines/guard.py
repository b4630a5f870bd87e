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
    prefix = tuple(output_ids[len(output_ids) - (n - 1):])
    start = max(0, len(output_ids) - w)
    end = len(output_ids) - n + 1
    banned = set()
    for i in range(start, end):
        gram = tuple(output_ids[i:i + n])
        if gram[:-1] == prefix:
            banned.add(gram[-1])
    return banned - set(params.whitelist)


class _Row:
    """Rolling history of one request: the last ``window`` real tokens, -1 padded on the left."""

    __slots__ = ("params", "out", "seen", "hist", "length")

    def __init__(self, params: GuardParams, out: list[int]) -> None:
        self.params = params
        self.out = out  # reference to vLLM's growing list of this request's output tokens
        self.seen = 0  # how many entries of ``out`` are folded into ``hist``
        self.hist = np.full(params.window, -1, dtype=np.int64)
        self.length = 0  # real tokens seen in total

    def sync(self) -> None:
        out = self.out
        end = len(out)
        # Async scheduling appends -1 placeholders that vLLM repairs before sampling; never fold
        # a placeholder into the history.
        while end > self.seen and out[end - 1] < 0:
            end -= 1
        k = end - self.seen
        if k <= 0:
            return
        w = self.hist.shape[0]
        new = np.asarray(out[self.seen:end] if k <= w else out[end - w:end], dtype=np.int64)
        m = new.shape[0]
        if m >= w:
            self.hist[:] = new[-w:]
        else:
            self.hist[:-m] = self.hist[m:]
            self.hist[-m:] = new
        self.seen = end
        self.length += k


def _banned_for_group(hist: np.ndarray, params: GuardParams, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised check for rows sharing ``params``: (row positions, banned tokens)."""
    n, w = params.ngram_size, params.window
    if n > w or n == 1:  # no n-gram fits in the window; n == 1 bans nothing upstream either
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nxt = hist[:, n - 1:]  # token completing each candidate n-gram: (b, w - n + 1)
    prefix = hist[:, w - n + 1:]  # the last n - 1 tokens: (b, n - 1)
    windows = np.lib.stride_tricks.sliding_window_view(hist, n - 1, axis=1)[:, : w - n + 1]
    match = (windows == prefix[:, None, :]).all(axis=2)
    valid = match & (nxt >= 0) & (lengths[:, None] >= n)
    if params.whitelist:
        valid &= ~np.isin(nxt, np.asarray(params.whitelist, dtype=np.int64))
    rows, cols = np.nonzero(valid)
    if rows.size == 0:
        return rows, rows
    toks = nxt[rows, cols]
    # One entry per (row, token): banning twice is harmless but wastes a scatter.
    key = np.unique(rows.astype(np.int64) * (1 << 32) + toks)
    return key >> 32, key & 0xFFFFFFFF


class GuardState:
    """Batch state of the guard: one ``_Row`` per persistent-batch index that uses it."""

    def __init__(self) -> None:
        self.rows: dict[int, _Row] = {}

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
            rows.pop(index, None)
        for index, extra, out in added:
            params = GuardParams.from_extra_args(extra)
            if params is None:
                rows.pop(index, None)
            else:
                rows[index] = _Row(params, out)
        for a, b, swap in moved:
            ra, rb = rows.pop(a, None), rows.pop(b, None)
            if ra is not None:
                rows[b] = ra
            if swap and rb is not None:
                rows[a] = rb

    # -- the per-step check ----------------------------------------------------------------------
    def banned(self) -> tuple[np.ndarray, np.ndarray]:
        """Sync every row with its output list and return (batch indices, banned token ids)."""
        if not self.rows:
            empty = np.empty(0, np.int64)
            return empty, empty
        groups: dict[GuardParams, list[tuple[int, _Row]]] = {}
        for index, row in self.rows.items():
            row.sync()
            if row.length >= row.params.ngram_size:
                groups.setdefault(row.params, []).append((index, row))
        out_rows: list[np.ndarray] = []
        out_toks: list[np.ndarray] = []
        for params, members in groups.items():
            hist = np.stack([r.hist for _, r in members])
            lengths = np.fromiter((r.length for _, r in members), dtype=np.int64, count=len(members))
            pos, toks = _banned_for_group(hist, params, lengths)
            if pos.size:
                idx = np.fromiter((i for i, _ in members), dtype=np.int64, count=len(members))
                out_rows.append(idx[pos])
                out_toks.append(toks)
        if not out_rows:
            empty = np.empty(0, np.int64)
            return empty, empty
        return np.concatenate(out_rows), np.concatenate(out_toks)


def apply_bans(logits: Any, rows: np.ndarray, toks: np.ndarray, *, pin_memory: bool = False,
               neg_inf: Any = None) -> Any:
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
