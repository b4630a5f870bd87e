"""Tests for runner/engines/guard.py: the vectorised n-gram guard against upstream's semantics."""

from __future__ import annotations

import importlib.util
import random
from typing import Any

import numpy as np
import pytest
import torch

from runner.engines.guard import GuardParams, GuardState, apply_bans, reference_banned
from runner.engines.guard_torch import DeviceGuardState

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _looping_sequence(rng: random.Random, length: int, vocab: int) -> list[int]:
    """Random tokens with planted repeats, so that bans actually happen."""
    seq: list[int] = []
    while len(seq) < length:
        if len(seq) > 8 and rng.random() < 0.5:
            start = rng.randrange(0, len(seq) - 4)
            seq.extend(seq[start : start + rng.randint(3, 40)])
        else:
            seq.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 10)))
    return seq[:length]


def _step_all(state: GuardState | DeviceGuardState, vocab: int) -> dict[int, set[int]]:
    logits = torch.randn(max(state.rows, default=-1) + 1, vocab)
    before = logits.clone()
    if isinstance(state, DeviceGuardState):
        logits = state.apply(logits.to(state.device)).cpu()
    else:
        rows, toks = state.banned()
        apply_bans(logits, rows, toks)
    banned = torch.isinf(logits)
    assert torch.equal(logits[~banned], before[~banned])  # nothing else is touched
    return {i: set(torch.nonzero(banned[i]).flatten().tolist()) for i in state.rows}


STATES = pytest.mark.parametrize(
    "make_state", [GuardState, lambda: DeviceGuardState("cpu")], ids=["numpy", "device"]
)


@STATES
@pytest.mark.parametrize("n,w", [(1, 5), (2, 2), (2, 5), (3, 10), (5, 12), (30, 90), (20, 50), (4, 9)])
def test_matches_reference_step_by_step(n: int, w: int, make_state: Any) -> None:
    rng = random.Random(n * 1000 + w)
    vocab = 12
    wl = (3, 4)
    params = GuardParams(n, w, wl)
    seqs = [_looping_sequence(rng, rng.randint(n + 5, 3 * w + 40), vocab) for _ in range(6)]
    outs: list[list[int]] = [[] for _ in seqs]
    state = make_state()
    state.update([], [(i, params.extra_args(), outs[i]) for i in range(len(seqs))], [])
    banned_total = 0
    for step in range(max(len(s) for s in seqs)):
        for i, s in enumerate(seqs):
            if step < len(s):
                outs[i].append(s[step])
        got = _step_all(state, vocab)
        for i in range(len(seqs)):
            want = reference_banned(outs[i], params)
            assert got[i] == want, (i, step)
            banned_total += len(want)
    assert banned_total > 0 or n == 1  # the planted repeats did trigger the guard (n=1 never bans)


@STATES
def test_whitelist_is_never_banned(make_state: Any) -> None:
    params = GuardParams(2, 10, whitelist=(7,))
    out = [7, 7, 7, 7]
    state = make_state()
    state.update([], [(0, params.extra_args(), out)], [])
    assert _step_all(state, 10)[0] == set()
    assert reference_banned([5, 7, 5], GuardParams(2, 10)) == {7}


@STATES
def test_batch_moves_swaps_and_removals_follow_requests(make_state: Any) -> None:
    p = GuardParams(2, 8)
    a, b, c = [1, 2, 1], [4, 5, 4], [6, 6]
    state = make_state()
    state.update([], [(0, p.extra_args(), a), (1, p.extra_args(), b), (2, None, c)], [])
    assert set(state.rows) == {0, 1}  # no guard args -> not tracked
    assert _step_all(state, 8) == {0: {2}, 1: {5}}
    state.update([], [], [(0, 1, True)])  # swap
    assert _step_all(state, 8) == {0: {5}, 1: {2}}
    state.update([0], [], [(1, 0, False)])  # remove 0, then move 1 -> 0
    assert _step_all(state, 8) == {0: {2}}


@STATES
def test_async_placeholders_are_not_history(make_state: Any) -> None:
    p = GuardParams(2, 8)
    out = [1, 2, 1, -1]
    state = make_state()
    state.update([], [(0, p.extra_args(), out)], [])
    assert _step_all(state, 4) == {0: {2}}
    out[-1] = 2  # vLLM repairs the placeholder before sampling
    assert _step_all(state, 4)[0] == reference_banned(out, p) == {1}


def test_params_parse_upstream_keys() -> None:
    assert GuardParams.from_extra_args(None) is None
    assert GuardParams.from_extra_args({"other": 1}) is None
    p = GuardParams.from_extra_args({"ngram_size": 3, "whitelist_token_ids": [9, 2, 9]})
    assert p == GuardParams(3, 100, (2, 9))
    with pytest.raises(ValueError):
        GuardParams.from_extra_args({"ngram_size": 0})


def test_vectorised_check_is_fast_at_batch_256() -> None:
    rng = np.random.default_rng(0)
    p = GuardParams(30, 90)
    outs = [list(map(int, rng.integers(0, 1000, 500))) for _ in range(256)]
    state = GuardState()
    state.update([], [(i, p.extra_args(), o) for i, o in enumerate(outs)], [])
    state.banned()
    import time

    t0 = time.perf_counter()
    for step in range(20):
        for o in outs:
            o.append(step)
        state.banned()
    per_step = (time.perf_counter() - t0) / 20
    assert per_step < 0.02, per_step  # a decode step at batch 256 takes ~30 ms on an H100


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not importable here (runs on the GPU machine)")
@pytest.mark.parametrize(
    "make_state",
    [GuardState, lambda: DeviceGuardState("cuda" if torch.cuda.is_available() else "cpu")],
    ids=["numpy", "device"],
)
def test_equivalent_to_vllm_no_repeat_ngram_processor(make_state: Any) -> None:
    from vllm.model_executor.models.deepseek_ocr import NoRepeatNGramLogitsProcessor

    rng = random.Random(7)
    vocab = 50
    for trial in range(40):
        n = rng.randint(1, 35)
        w = rng.randint(n, 120)
        wl = tuple(rng.sample(range(vocab), 3))
        params = GuardParams(n, w, wl)
        upstream = NoRepeatNGramLogitsProcessor(n, w, set(wl))
        seq = _looping_sequence(rng, rng.randint(1, 300), vocab)
        state = make_state()
        out: list[int] = []
        state.update([], [(0, params.extra_args(), out)], [])
        for tok in seq:
            out.append(tok)
            mine = _step_all(state, vocab)[0]
            ref = upstream(list(out), torch.zeros(vocab))
            theirs = set(torch.nonzero(torch.isinf(ref)).flatten().tolist())
            assert mine == theirs, (trial, len(out))


def test_device_guard_matches_reference_under_batch_churn() -> None:
    """Random adds, removals, moves, swaps, multi-token and placeholder steps: both states ban
    exactly what the reference bans for every live row, every step."""
    rng = random.Random(11)
    vocab = 16
    params = [GuardParams(3, 12, (5,)), GuardParams(4, 9), GuardParams(2, 6, (1, 2))]
    host, dev = GuardState(), DeviceGuardState("cpu")
    live: dict[int, tuple[GuardParams, list[int], list[int]]] = {}  # index -> params, source, out
    checked = 0
    for _step in range(400):
        removed, added, moved = [], [], []
        for idx in list(live):
            if rng.random() < 0.03:
                removed.append(idx)
                del live[idx]
        free = [i for i in range(10) if i not in live]
        if free and rng.random() < 0.3:
            idx = rng.choice(free)
            p = rng.choice(params)
            src = _looping_sequence(rng, rng.randint(20, 120), vocab)
            out: list[int] = []
            live[idx] = (p, src, out)
            added.append((idx, p.extra_args(), out))
        if len(live) >= 2 and rng.random() < 0.2:
            a, b = rng.sample(sorted(live), 2)
            if rng.random() < 0.5:
                moved.append((a, b, True))
                live[a], live[b] = live[b], live[a]
            else:  # one-way move: b's request is overwritten (vLLM removes it first)
                removed.append(b)
                del live[b]
                host.update([b], [], [])
                dev.update([b], [], [])
                removed.remove(b)
                moved.append((a, b, False))
                live[b] = live.pop(a)
        host.update(removed, added, moved)
        dev.update(removed, added, moved)
        for _idx, (_p, src, out) in live.items():
            k = 2 if rng.random() < 0.05 else 1  # now and then two tokens in one step
            out.extend(src[len(out) : len(out) + k] or [rng.randrange(vocab)])
        got_h, got_d = _step_all(host, vocab), _step_all(dev, vocab)
        for idx, (p, _src, out) in live.items():
            want = reference_banned(out, p)
            assert got_h[idx] == want and got_d[idx] == want, (idx, _step)
            checked += len(want)
    assert checked > 50
