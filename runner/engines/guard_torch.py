"""Repetition guard on the device (engine stage): the same bans as ``runner.engines.guard``,
computed where the logits live so the host never waits for them.

Why: in vLLM's v1 model runner a logits processor runs on the host between the forward pass and
sampling. The numpy guard (``GuardState``) does its n-gram search there, on the critical path of
every decode step (3-6 ms at batch 512, ~15-20% of a step on an H100). Here the host only does
bookkeeping (which request is in which row, one new token per request per step, uploaded from
pinned memory without blocking); histories stay on the device, and the search and the bans are a
handful of fixed-shape tensor ops queued behind the forward pass. No ``nonzero``, no ``.item()``,
nothing that makes the host wait for the GPU.

Semantics are identical to ``reference_banned`` (upstream's ``NoRepeatNGramLogitsProcessor``):
checked against it step by step in ``tests/test_guard.py``, on CPU tensors in CI.

In: the same ``update`` events as ``GuardState`` and the logits tensor of a step.
Out: the logits, with banned (row, token) entries at -inf (in place).
"""

from __future__ import annotations

import torch

from runner.engines.guard import BatchRows, GuardParams


class _DevicePool:
    """Histories of every request sharing one ``GuardParams``: a (capacity, window) device
    tensor, -1 padded on the left, newest token last. A slot stays with its request."""

    def __init__(self, params: GuardParams, device: torch.device) -> None:
        self.params = params
        self.device = device
        self.hist = torch.full((8, params.window), -1, dtype=torch.int64, device=device)
        self.free = list(range(7, -1, -1))
        self.reset: list[int] = []  # slots taken since the last step: cleared on the device then
        wl = torch.tensor(params.whitelist, dtype=torch.int64)
        self.whitelist = wl.to(device) if len(params.whitelist) else None

    def take(self) -> int:
        if not self.free:
            cap = self.hist.shape[0]
            grown = torch.full((cap * 2, self.params.window), -1, dtype=torch.int64, device=self.device)
            grown[:cap] = self.hist
            self.hist = grown
            self.free = list(range(cap * 2 - 1, cap - 1, -1))
        slot = self.free.pop()
        self.reset.append(slot)
        return slot

    def give(self, slot: int) -> None:
        self.free.append(slot)


class DeviceGuardState(BatchRows):
    """Batch state of the device guard: one row per persistent-batch index that uses it."""

    def __init__(self, device: torch.device | str, pin_memory: bool = False) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.pin_memory = pin_memory and self.device.type == "cuda"

    def _new_pool(self, params: GuardParams) -> _DevicePool:
        return _DevicePool(params, self.device)

    # -- the per-step work -----------------------------------------------------------------------
    def _upload(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64)
        if self.pin_memory:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold each row's new tokens into the device histories, then set banned logits to -inf."""
        if not self.rows:
            return logits
        # Host side: which slot gets which new token(s); which rows are long enough to check.
        work = self.advance()
        for pool in set(work.shift) | set(work.full) | {p for p in self.pools.values() if p.reset}:
            self._fold(pool, work.shift.get(pool), work.full.get(pool, []))
        for pool, (idx, rslots) in work.ready.items():
            self._ban(pool, logits, idx, rslots)
        return logits

    def _fold(
        self, pool: _DevicePool, shift: tuple[list[int], list[int]] | None, full: list[tuple[int, list[int]]]
    ) -> None:
        h = pool.hist
        w = pool.params.window
        if pool.reset:
            h.index_fill_(0, self._upload(pool.reset), -1)
            pool.reset = []
        if shift is not None:
            slots, toks = shift
            both = self._upload(slots + toks)
            sl, tk = both[: len(slots)], both[len(slots) :]
            h[sl] = torch.cat([h[sl, 1:], tk[:, None]], dim=1)
        for slot, new in full:
            # Several tokens at once (first sync, or a step with more than one new token): rare.
            m = len(new)
            row = h[slot]
            if m >= w:
                row.copy_(self._upload(new[-w:]))
            else:
                row[: w - m] = row[m:].clone()
                row[w - m :] = self._upload(new)

    def _ban(self, pool: _DevicePool, logits: torch.Tensor, idx: list[int], rslots: list[int]) -> None:
        n, w = pool.params.ngram_size, pool.params.window
        if n > w or n == 1:  # nothing fits / upstream never bans for n == 1 (see reference_banned)
            return
        m, s = n - 1, w - n + 1  # prefix length; number of candidate windows
        both = self._upload(idx + rslots)
        rows_b, slots = both[: len(idx)], both[len(idx) :]
        h = pool.hist[slots]  # (R, w)
        suffix = h[:, s:]  # the last n-1 tokens (all real: the row has >= n tokens)
        windows = h.unfold(1, m, 1)[:, :s]  # (R, s, m): window j = h[:, j:j+m]
        match = (windows == suffix[:, None, :]).all(dim=2)  # windows with pads never match
        nxt = h[:, m : m + s]  # the token that followed window j
        if pool.whitelist is not None:
            match &= ~torch.isin(nxt, pool.whitelist)
        # -inf where banned, +0 elsewhere, accumulated: duplicates of one token in a row (banned
        # at one position, not at another) cannot race, and nothing waits for a nonzero().
        add = torch.zeros(match.shape, dtype=logits.dtype, device=logits.device)
        add.masked_fill_(match, float("-inf"))
        cols = nxt.clamp_min(0)
        logits.index_put_((rows_b[:, None].expand_as(cols), cols), add, accumulate=True)
