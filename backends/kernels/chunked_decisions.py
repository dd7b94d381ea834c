"""torch-chunked's phase 1 compiled: one chunk's decisions, a loop over its tokens per stream.

``decide`` takes one chunk's scalars (``torch_chunked.ChunkScalars``), the counts at its
start (``torch_chunked.Carry``) and an optional forced trace, all NumPy on the host, and
returns the counts at its end and the chunk's ``torch_chunked.ChunkDecisions``. Streams are
independent and run in parallel (``prange``); each walks its C tokens in order, so the
open slot's norm and dot product follow token by token in closed form
(docs/spec/information-score.md, proofs/chunked_prefill.md §2), all in float64.

Which path runs: with numba importable, ``decide_streams`` is compiled (``njit``,
``cache=True``, ``parallel=True``); without it, the very same function runs as plain Python
(correct, slow), so torch-chunked needs only torch.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # the same loops, interpreted
    prange = range

    def njit(*args, **kwargs):
        return args[0] if args and callable(args[0]) else (lambda f: f)

MAX_SCORE = 2.0  # dla_ref.step.MAX_SCORE: the largest normalized score


def decide(x, carry, opts, size, forced=None):
    """DLA's decisions for one chunk.   -> ((m, n, info) at its end, the decisions' arrays)

    x: ``ChunkScalars`` (N streams, C tokens); carry: (m [N], n [N, K], info [N, K]) at the
    chunk start; opts: the run's ``Options``; size = Dk * Dv; forced: (boundary [N, C],
    merged [N, C]) of a forced trace, or None. The decisions are (scores, boundary, merged,
    used, first_item, open_first), as ``ChunkDecisions`` documents them.
    """
    f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
    N, C = x.token_norm.shape
    is_forced = forced is not None
    fb, fm = forced if is_forced else (np.zeros((N, C), bool), np.full((N, C), -1))
    fb, fm = np.ascontiguousarray(fb, dtype=np.bool_), np.ascontiguousarray(fm, dtype=np.int64)
    m = np.array(carry.m, dtype=np.int64)
    n = np.array(carry.n, dtype=np.int64)
    info = np.array(carry.info, dtype=np.float64)
    K = n.shape[1]
    out = (np.zeros((N, C)), np.zeros((N, C), dtype=np.bool_), np.full((N, C), -1, np.int64),
           np.zeros((N, C), dtype=np.int64), np.zeros((N, C, K), dtype=np.int64),
           np.zeros(N, dtype=np.int64))
    decide_streams(f64(x.token_norm), f64(x.start_norm), f64(x.start_dot), f64(x.start_decay2),
                   f64(x.gram_prefix), f64(x.gram_before), f64(x.decay2),
                   np.ascontiguousarray(x.silent, dtype=np.bool_), m, n, info, is_forced, fb, fm,
                   opts.capacity, float(opts.tau), opts.score == "token", bool(opts.normalize),
                   float(opts.eps), float(size), *out)
    return (m, n, info), out


@njit(cache=True, parallel=True)
def decide_streams(token_norm, start_norm, start_dot, start_decay2, gram_prefix, gram_before,
                   decay2, silent, m, n, info, is_forced, forced_boundary, forced_merged,
                   capacity, tau, token_mode, normalize, eps, size,
                   scores, boundary, merged, used, first_item, open_first):
    """Every stream's chunk (prange); m, n, info are updated in place, the rest written."""
    for r in prange(token_norm.shape[0]):
        decide_stream(token_norm[r], start_norm[r], start_dot[r], start_decay2[r],
                      gram_prefix[r], gram_before[r], decay2[r], silent[r], m[r:r + 1], n[r],
                      info[r], is_forced, forced_boundary[r], forced_merged[r], capacity, tau,
                      token_mode, normalize, eps, size, scores[r], boundary[r], merged[r],
                      used[r], first_item[r], open_first[r:r + 1])


@njit(cache=True)
def decide_stream(token_norm, start_norm, start_dot, start_decay2, gram_prefix, gram_before,
                  decay2, silent, m_, n, info, is_forced, forced_boundary, forced_merged,
                  capacity, tau, token_mode, normalize, eps, size,
                  scores, boundary, merged, used, first_item, open_first):
    """One stream's chunk, token by token (C tokens, K slots).

    The open slot holds the chunk-start open state S_0 (``holds_start``) and the chunk's
    tokens first ... j-1. For token j, with p the open slot's first undecided token
    (the token after its last boundary, or 0):

        <S_open, s_j> = [holds_start] start_dot_j + gram_before_j - gram_prefix[j, first]
        ||S_open||^2  = max(since_j open_norm + sum_{r=p}^{j-1} decay2[j, r] grow_r, 0)
        grow_r        = 2 <S_open, s_r> + ||s_r||^2,
        since_j       = exp(2 (L_j - L_{p-1})) (start_decay2_j if p = 0)

    I_j = 0 at an empty cache and for a zero contribution (``silent``), else the
    three-scalar score. A boundary (the forced one, or dla_ref.step's rule: [m = 0] or
    [I_j >= tau] where K > 1, never for a silent token at m > 0) merges the least dense
    adjacent pair of a full cache (ties to the oldest; or the forced index) and opens a
    slot; otherwise J_{m-1} += I_j, n_{m-1} += 1 (slot 0 when m = 0, as the reference
    writes). items counts a chunk-start slot as one item and each token as another; the
    first items of the used slots (``first_items``) change only at a boundary.
    """
    C = token_norm.shape[0]
    K = n.shape[0]
    m = m_[0]
    m0 = m
    items = np.zeros(K, dtype=np.int64)
    for i in range(min(m, K)):
        items[i] = 1
    starts = np.empty(K, dtype=np.int64)
    first_items_of(items, m, m0, K, C, starts)
    grow = np.zeros(C)
    holds_start = m > 0
    first = 0
    p = 0
    open_norm = start_norm
    for j in range(C):
        dot = start_dot[j] if holds_start else 0.0
        dot = dot + gram_before[j] - gram_prefix[j, first]
        norm = (start_decay2[j] if p == 0 else decay2[j, p - 1]) * open_norm
        acc = 0.0
        for s in range(p, j):
            acc += decay2[j, s] * grow[s]
        norm = norm + acc
        if norm < 0.0:
            norm = 0.0
        grow[j] = 2 * dot + token_norm[j]
        score = 0.0
        if m > 0 and not silent[j]:
            score = score_from_scalars(token_norm[j], norm, dot, size, token_mode, normalize,
                                       eps)
        if is_forced:
            opens = forced_boundary[j]
        elif m > 0 and capacity > 1:
            opens = score >= tau and not silent[j]
        else:
            opens = m == 0
        scores[j] = score
        if opens:
            pair = forced_merged[j] if is_forced else (
                least_dense_pair(n, info) if m == capacity else -1)
            if pair >= 0:
                merge_pair(n, pair)
                merge_pair(items, pair)
                merge_pair(info, pair)
                m -= 1
            if m < K:
                n[m] += 1
                items[m] += 1
                info[m] = info[m] + score
            m += 1
            boundary[j] = True
            merged[j] = pair
            first_items_of(items, m, m0, K, C, starts)
            holds_start = False
            first = j
            open_norm = token_norm[j]
            p = j + 1
        else:
            last = max(m - 1, 0)
            info[last] = info[last] + score
            n[last] += 1
            items[last] += 1
        used[j] = m
        first_item[j, :] = starts
    m_[0] = m
    open_first[0] = -1 if holds_start else first


@njit(cache=True)
def score_from_scalars(ss, SS, sS, size, token_mode, normalize, eps):
    """dla_ref.step.information_score_from_scalars for one token, in the same operations:

        I = min(sqrt(max(t_1 + t_2 + t_3, 0)) / (r_B ||B|| + eps), 2)   (no clamp if not
        normalize), with the terms of dla_ref.step.score_terms.
    """
    P = max(2 * sS + ss, -SS)
    AA = ss if token_mode else SS + P
    rA, rB = 1.0, 1.0
    if normalize:
        rA, rB = 1 / math.sqrt(AA / size + eps), 1 / math.sqrt(SS / size + eps)
    den = rB * math.sqrt(SS) + eps
    if token_mode:
        t1, t2, t3 = rA * rA * ss, -2 * rA * rB * sS, rB * rB * SS
    else:
        d = -(P / size) * (rA * rA) * (rB * rB) / (rA + rB) if normalize else 0.0
        t1, t2, t3 = d * d * SS, 2 * d * rA * sS, rA * rA * ss
    radicand = t1 + t2 + t3
    if radicand < 0.0:  # rounding below 0
        radicand = 0.0
    score = math.sqrt(radicand) / den
    if normalize and score > MAX_SCORE:
        score = MAX_SCORE
    return score


@njit(cache=True)
def least_dense_pair(n, info):
    """dla_ref.step.merge_choice's j for a full cache: argmin_j (J_j + J_{j+1}) /
    (n_j + n_{j+1}), +inf for a pair with no tokens, ties (and the first NaN) as
    NumPy's argmin; -1 for K = 1."""
    best, best_j = 0.0, -1
    for j in range(n.shape[0] - 1):
        count = n[j] + n[j + 1]
        density = (info[j] + info[j + 1]) / count if count > 0 else np.inf
        if density != density:
            return j
        if best_j < 0 or density < best:
            best, best_j = density, j
    return best_j


@njit(cache=True)
def merge_pair(x, j):
    """dla_ref.step.merge_adjacent for one stream's slot field x [K] (n, items or J):
    x_j += x_{j+1}, the later slots shift left, slot K-1 becomes 0."""
    x[j] = x[j] + x[j + 1]
    for i in range(j + 1, x.shape[0] - 1):
        x[i] = x[i + 1]
    x[x.shape[0] - 1] = 0


@njit(cache=True)
def first_items_of(items, m, m0, K, C, out):
    """torch_chunked.first_items for one stream, into out [K]: a used slot starts at the
    items packed before it (chunk-start slots 0 ... m0-1, then tokens numbered K + s);
    an unused slot gets K + C."""
    packed = 0
    for i in range(K):
        if i < m:
            out[i] = packed if packed < m0 else packed - m0 + K
        else:
            out[i] = K + C
        packed += items[i]
