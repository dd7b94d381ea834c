"""Exact chunked prefill (linear, mamba2): the chunked form computes ``dla_ref.dla``.

Statement. Cut every stream into chunks of any length C and let L_j be the chunk's
cumulative log decay. Then (Lemma 1) before token j is written the open state is

    S_open(j) = h_j exp(L_j) S_0 + sum_{s=a_j}^{j-1} exp(L_j - L_s) k_s v_s^T

(S_0 the open state at the chunk start, h_j = 1 iff no chunk token before j opened a
slot, a_j the last one that did); hence (Lemma 2) every score follows from the
chunk's decayed Gram matrix, k_j^T S_0 v_j and ||S_0||^2, boundary to boundary; and
(Lemmas 3, 4) the outputs and the next chunk's states follow from the partition by
matrix products. ``dla_backends.kernels.torch_chunked`` is that algorithm: in float64 its
trace, outputs and cache are the reference's.

Derivation: chunked_prefill.md.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref
from dla_ref.recurrent import cache_to_streams, empty_cache, to_streams
from dla_ref.validation import check_options

from ._cases import TOL, counterexample, dla_inputs, prefix, relative_error

torch = pytest.importorskip("torch", reason="the chunked prefill is written in torch")
from dla_backends.kernels import torch_chunked  # noqa: E402
from dla_backends.testing import Case, decision_margins  # noqa: E402

BACKBONES = ("linear", "mamba2")
# Scores near I = 0 come from an expansion that cancels (chunked_prefill.md §6): an
# absolute error of about sqrt(float64 epsilon) = 1.5e-8 there, hence this bound, also
# the margin below which a reference decision counts as a near-tie. J sums n scores.
SCORE_TOL = 1e-7


def chunked_cases(backbones=BACKBONES):
    """(case, C): a small case of ``dla_ref.dla`` and a chunk length 1 ... 5."""
    return st.tuples(dla_inputs(backbones=backbones, max_T=10, max_capacity=4),
                     st.integers(1, 5))


def streams(case, name):
    """An input [B, T, H, ...] as streams [N, T, ...] (float64)."""
    return to_streams(np, np.asarray(case[name], dtype=np.float64))


def log_decay(case):
    """log alpha as streams [N, T] (0 for linear)."""
    if case.get("log_alpha") is None:
        return np.zeros(streams(case, "q").shape[:2])
    return streams(case, "log_alpha")


def state_after(case, t):
    """The reference's cache (S, n, info, m) over streams after the first t tokens."""
    B, _, H, Dk = case["q"].shape
    if t == 0:
        return empty_cache(np, B * H, case["capacity"], Dk, case["v"].shape[3], np.float64)
    return cache_to_streams(np, dla_ref.dla(**prefix(case, t)).cache, np.float64)


def open_state(S, m):
    """S_{m-1} per stream, 0 where m = 0.   [N, Dk, Dv]"""
    rows = np.arange(S.shape[0])
    return np.where((m > 0)[:, None, None], S[rows, np.maximum(m - 1, 0)], 0.0)


# --- Lemma 1: the open state inside a chunk ----------------------------------------------


def open_state_error(case, C):
    """max over tokens of |S_open(j) - Lemma 1's expression| / max(1, |S_open(j)|)."""
    k, v, L = streams(case, "k"), streams(case, "v"), log_decay(case)
    boundary = to_streams(np, dla_ref.dla(**case).trace.boundary)
    N, T = boundary.shape
    worst = 0.0
    for t in range(T):
        c0 = t - t % C
        S_t, _, _, m_t = state_after(case, t)
        S_c0, _, _, m_c0 = state_after(case, c0)
        want = np.exp(L[:, t])[:, None, None] * open_state(S_t, m_t)  # after the transition
        decay = lambda s, t=t: np.exp(np.sum(L[:, s + 1:t + 1], axis=1))  # noqa: E731 d(t, s)
        got = np.zeros_like(want)
        for n in range(N):
            opened = np.flatnonzero(boundary[n, c0:t])
            a = c0 + opened[-1] if len(opened) else c0
            if not len(opened) and m_c0[n] > 0:
                got[n] += np.exp(np.sum(L[n, c0:t + 1])) * open_state(S_c0, m_c0)[n]
            for s in range(a, t):
                got[n] += decay(s)[n] * np.outer(k[n, s], v[n, s])
        worst = max(worst, relative_error(got, want))
    return worst


@settings(max_examples=25)
@given(chunked=chunked_cases())
def test_open_state_inside_a_chunk(chunked):
    case, C = chunked
    assert open_state_error(case, C) <= TOL


# --- Lemma 2: decisions from the Gram matrix -----------------------------------------------


def scalars_from_definitions(k, v, L, S0, slip=None):
    """``ChunkScalars`` of one chunk by their definitions (chunked_prefill.md §2), NumPy.

    k [N, C, Dk], v [N, C, Dv], L [N, C] the chunk's cumulative log decay, S0 [N, Dk, Dv].
    slip: None, or a plausible mistake to show the check has teeth.
    """
    C = L.shape[1]
    j = np.arange(C)
    earlier = j[:, None] > j[None, :]
    d = np.where(earlier, np.exp(np.where(earlier, L[:, :, None] - L[:, None, :], 0.0)), 0.0)
    gram = np.einsum("njd,nsd->njs", k, k) * np.einsum("nje,nse->njs", v, v)
    gram = np.where(earlier, gram, 0.0) if slip == "gram not decayed" else gram * d
    prefix_sums = np.concatenate([np.zeros(gram.shape[:2] + (1,)), np.cumsum(gram, axis=2)],
                                 axis=2)
    start = np.exp(L)
    start_decay2 = np.ones_like(start) if slip == "start not decayed" else start ** 2
    return torch_chunked.ChunkScalars(
        token_norm=np.sum(k * k, axis=2) * np.sum(v * v, axis=2),
        start_norm=np.sum(S0 * S0, axis=(1, 2)),
        start_dot=start * np.einsum("njd,nde,nje->nj", k, S0, v),
        start_decay2=start_decay2,
        gram_prefix=prefix_sums,
        gram_before=prefix_sums[:, j, j],
        decay2=d * d,
        silent=~np.any(k != 0, axis=2) | ~np.any(v != 0, axis=2),  # a zero contribution
    )


def chunked_decisions(case, C, slip=None):
    """(scores, boundary, merged) [N, T] from ``decide_chunk``, chunk by chunk.

    Each chunk starts from the reference's exact states (slot m - 1 by the carried m),
    so that phase 1 is checked on its own.
    """
    opts = check_options(capacity=case["capacity"], tau=case["tau"], backbone=case["backbone"],
                         score=case["score"], normalize=case["normalize"],
                         slots=case["slots"], eps=1e-6)
    k, v, L = streams(case, "k"), streams(case, "v"), log_decay(case)
    N, T, Dk = k.shape
    _, n, info, m = state_after(case, 0)
    carry = torch_chunked.Carry(m, n, info)
    made = []
    for c0 in range(0, T, C):
        part = slice(c0, min(c0 + C, T))
        S = state_after(case, c0)[0]
        x = scalars_from_definitions(k[:, part], v[:, part], np.cumsum(L[:, part], axis=1),
                                     open_state(S, carry.m), slip)
        carry, decided = torch_chunked.decide_chunk(x, carry, opts, Dk * v.shape[2])
        made.append(decided)
    return tuple(np.concatenate([getattr(d, f) for d in made], axis=1)
                 for f in ("scores", "boundary", "merged"))


def clear_decisions(case):
    """The reference's trace and, per [B, T, H], whether every decision up to t is clear
    (score farther than SCORE_TOL from tau, merged pair SCORE_TOL less dense than the next)."""
    options = {name: case[name] for name in ("backbone", "tau", "capacity", "score",
                                             "normalize", "slots")}
    want, margins = decision_margins(Case(q=case["q"], k=case["k"], v=case["v"],
                                          lam=case["lam"], log_alpha=case.get("log_alpha"),
                                          options=options))
    unclear = (margins.score <= SCORE_TOL) | (margins.density <= SCORE_TOL)
    return want, np.cumsum(unclear, axis=1) == 0


@settings(max_examples=40)
@given(chunked=chunked_cases())
def test_decisions_from_the_gram_matrix(chunked):
    case, C = chunked
    scores, boundary, merged = chunked_decisions(case, C)
    want, clear = clear_decisions(case)
    clear = to_streams(np, clear)
    for got, expected in ((boundary, want.boundary), (merged, want.merged)):
        assert np.array_equal(np.where(clear, got, 0), np.where(clear, to_streams(np, expected), 0))
    assert np.max(np.abs(np.where(clear, scores - to_streams(np, want.scores), 0))) <= SCORE_TOL


# --- Lemmas 3, 4: the whole chunked prefill ---------------------------------------------------


def as_torch(case):
    return {name: (torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x)
            for name, x in case.items()}


def cache_error(got, want):
    """Whether a torch cache matches the reference's: S relatively within TOL, n and m
    equal, each J within n * SCORE_TOL (a sum of n scores)."""
    S, n, info, m = (x.numpy() for x in got)
    return (relative_error(S, want.S) <= TOL and np.array_equal(n, want.n)
            and np.array_equal(m, want.m)
            and bool(np.all(np.abs(info - want.info) <= np.maximum(want.n, 1) * SCORE_TOL)))


@settings(max_examples=40)
@given(chunked=chunked_cases())
def test_chunked_prefill_equals_the_recurrent_form(chunked):
    case, C = chunked
    want = dla_ref.dla(**case)
    free = torch_chunked.dla(**as_torch(case), chunk=C)
    _, clear = clear_decisions(case)
    if clear.all():
        assert np.array_equal(free.trace.boundary.numpy(), want.trace.boundary)
        assert np.array_equal(free.trace.merged.numpy(), want.trace.merged)
        assert relative_error(free.o.numpy(), want.o) <= TOL
    forced = torch_chunked.dla(**as_torch(case), chunk=C,
                               trace=dla_ref.Trace(*(torch.from_numpy(x) for x in want.trace)))
    assert relative_error(forced.o.numpy(), want.o) <= TOL
    assert cache_error(forced.cache, want.cache)
    assert np.max(np.abs(forced.trace.scores.numpy() - want.trace.scores)) <= SCORE_TOL


@settings(max_examples=25)
@given(chunked=chunked_cases(), split=st.integers(1, 9))
def test_chunked_prefill_continues_an_initial_cache(chunked, split):
    """dla(x[:t]) then the chunked prefill of x[t:] from its cache = dla(x)."""
    case, C = chunked
    T = case["q"].shape[1]
    split = min(split, T - 1)
    if split < 1:
        return
    cache = dla_ref.dla(**prefix(case, split)).cache
    rest = {name: (x[:, split:] if name in ("q", "k", "v", "lam", "log_alpha") and x is not None
                   else x) for name, x in case.items()}
    want = dla_ref.dla(**rest, initial_cache=cache)
    got = torch_chunked.dla(**as_torch(rest), chunk=C, trace=dla_ref.Trace(
        *(torch.from_numpy(x) for x in want.trace)),
        initial_cache=dla_ref.Cache(*(torch.from_numpy(x) for x in cache)))
    assert relative_error(got.o.numpy(), want.o) <= TOL
    assert cache_error(got.cache, want.cache)


# --- teeth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("slip", ["start not decayed", "gram not decayed"])
def test_the_check_catches_a_wrong_scalar(slip):
    def violates(chunked):
        case, C = chunked
        scores, _, _ = chunked_decisions(case, C, slip)
        reference = to_streams(np, dla_ref.dla(**case).trace.scores)
        return np.max(np.abs(scores - reference)) > 1e-6

    counterexample(chunked_cases(backbones=("mamba2",)), violates)
