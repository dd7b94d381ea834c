"""The Numba backend ("numba"): DLA's recurrent scan, compiled, parallel over streams.

One stream is scanned token by token by compiled code (``numba.njit``); the N = B*H
streams run in parallel with ``prange``, independently, so the result does not depend
on the number of threads. The state is kept in the inputs' dtype (float32 or float64);
the score comes from three scalars accumulated in float64. No fastmath: the reference
relies on IEEE semantics (tau = +-inf, exact ties) and reductions keep a fixed order.
The host side (checks, layout, forced traces, the result) is ``dla_backends.host``.

Versions (each bitwise equal to the one before; the shipped one is tested):
- v1: a direct port of ``dla_ref.step``, one sweep per step; a merge shifted the later
  slot states left in place (no longer in the tree).
- v2 (shipped): token t's readout and token t+1's transition in one sweep over the slots,
  and slot i held in buffer ``order[i]``, so a merge moves K ints instead of K states.

Design notes, departures from the reference and timings: docs/kernels.md.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dla_backends import host

LINEAR, MAMBA2, GDN = 0, 1, 2
BACKBONE_CODE = {"linear": LINEAR, "mamba2": MAMBA2, "gdn": GDN}


def dla(q, k, v, lam=None, **options):
    """``dla_ref.dla`` compiled, on NumPy arrays: the same keywords, checks, errors and
    result. S, info, the scores and o are in the inputs' result dtype (float32/float64)."""
    return host.run(launch, q, k, v, lam, backend="numba", **options)


def launch(call: host.Call) -> host.Launched:
    """``scan_streams`` on contiguous streams; it writes the call's own cache in place."""
    (N, T), dtype = call.streams, call.state_dtype
    # alpha = 1 (linear) and beta = 1 (linear, mamba2) where the backbone has none
    q, k, v, lam, alpha, beta = (np.ones((N, T), dtype) if x is None else
                                 np.ascontiguousarray(x) for x in call.tokens)
    S, n, info, m = (np.ascontiguousarray(x) for x in call.cache)
    if call.forced is None:
        boundary, merged = np.zeros((N, T), np.bool_), np.full((N, T), -1, np.int64)
    else:
        boundary, merged = call.forced
    o = np.empty((N, T, v.shape[2]), dtype)
    scores = np.empty((N, T), dtype)
    opts = call.opts
    scan_streams(q, k, v, lam, alpha, beta, S, n, info, m, o, scores, boundary, merged,
                 call.forced is not None, BACKBONE_CODE[opts.backbone], opts.score == "state",
                 opts.normalize, opts.slots == "newest-first", opts.tau, opts.eps)
    return host.Launched(o, (S, n, info, m), (scores, boundary, merged))


# --- the scan: all streams in parallel, one stream token by token --------------------


@njit(cache=True, parallel=True)
def scan_streams(q, k, v, lam, alpha, beta, S, n, info, m, o, scores, boundary, merged,
                 forced, backbone, state_score, normalize, newest_first, tau, eps):
    """Run ``scan_stream`` for every stream, in parallel.

    Streams [N, ...]: q, k [N, T, Dk]; v [N, T, Dv]; lam [N, T, K]; alpha, beta [N, T];
    cache S [N, K, Dk, Dv], n [N, K], info [N, K], m [N] (updated in place);
    outputs o [N, T, Dv], scores [N, T]; boundary, merged [N, T]: read if ``forced``,
    else written.
    """
    for i in prange(q.shape[0]):
        m[i] = scan_stream(q[i], k[i], v[i], lam[i], alpha[i], beta[i], S[i], n[i], info[i],
                           m[i], o[i], scores[i], boundary[i], merged[i], forced, backbone,
                           state_score, normalize, newest_first, tau, eps)


@njit(cache=True)
def scan_stream(q, k, v, lam, alpha, beta, S, n, info, m, o, scores, boundary, merged,
                forced, backbone, state_score, normalize, newest_first, tau, eps):
    """One stream, t = 0 ... T-1: the step of docs/index.md, in its order.   -> m after token T-1

    q, k [T, Dk]; v [T, Dv]; lam [T, K]; alpha, beta [T]; S [K, Dk, Dv], n, info [K]
    and the int m are the stream's cache; o [T, Dv] and scores [T] are written;
    boundary, merged [T] are read if ``forced``, else written.

    Step 1 (transition) of token t+1 is done slot by slot together with step 6
    (readout) of token t, which reads the same states just before.
    """
    order = np.arange(S.shape[0])  # slot i is held by buffer order[i]
    m = scan_in_buffers(q, k, v, lam, alpha, beta, S, order, n, info, m, o, scores, boundary,
                        merged, forced, backbone, state_score, normalize, newest_first, tau,
                        eps)
    put_in_slot_order(S, order)
    return m


@njit(cache=True)
def scan_in_buffers(q, k, v, lam, alpha, beta, S, order, n, info, m, o, scores, boundary,
                    merged, forced, backbone, state_score, normalize, newest_first, tau, eps):
    """``scan_stream`` with slot i held in buffer order[i] before and after (order [K],
    updated in place), so that S is left in buffer order.   -> m after token T-1"""
    T = q.shape[0]
    K, _, Dv = S.shape
    qS, kS = np.empty(Dv, S.dtype), np.empty(Dv, S.dtype)  # q^T S_i, k^T S_i
    terms = np.empty((2, Dv), np.float64)  # per-column partial sums of the score terms
    transition(S, order, m, k[0], alpha[0], beta[0], backbone, kS)
    for t in range(T):
        silent = zero_contribution(k[t], v[t], beta[t])
        if m > 0 and not silent:
            scores[t] = information_score(S[order[m - 1]], k[t], v[t], beta[t],
                                          state_score, normalize, eps, terms)
        else:
            # I_0 := 0 for the first token of an empty cache, and I_t := 0 for a zero
            # contribution (docs/spec/information-score.md)
            scores[t] = 0.0
        if not forced:
            boundary[t] = is_boundary(scores[t], m, K, tau, silent)
            merged[t] = merge_choice(n, info, m, K, boundary[t])
        if merged[t] >= 0:
            merge_adjacent(S, order, n, info, merged[t], m)
            m -= 1
        m = write_token(S, order, n, info, m, boundary[t], k[t], v[t], beta[t], scores[t])
        u = min(t + 1, T - 1)  # the next token, if any
        readout_then_transition(q[t], lam[t], newest_first, o[t], S, order, m, k[u],
                                alpha[u], beta[u], backbone if t + 1 < T else LINEAR,
                                qS, kS)
    return m


# --- 1. transition ----------------------------------------------------------------


@njit(cache=True)
def transition(S, order, m, k, alpha, beta, backbone, kS):
    """S_i <- G_t S_i for the m used slots.   S [K, Dk, Dv] (slot i in S[order[i]])

    linear: G_t = 1 (nothing to do); mamba2: G_t = alpha_t; gdn: G_t =
    alpha_t (I - beta_t k_t k_t^T), applied to each slot as a rank-1 update (O(Dk Dv)),
    never as a Dk x Dk matrix. k [Dk]; kS [Dv] scratch.
    """
    if backbone == MAMBA2:
        for i in range(m):
            decay(S[order[i]], alpha)
    elif backbone == GDN:
        for i in range(m):
            delta_rule(S[order[i]], k, alpha, beta, kS)


@njit(cache=True)
def decay(X, alpha):
    """X <- alpha X.   X [Dk, Dv]"""
    Dk, Dv = X.shape
    for a in range(Dk):
        for b in range(Dv):
            X[a, b] *= alpha


@njit(cache=True)
def delta_rule(X, k, alpha, beta, kX):
    """X <- alpha (X - beta k (k^T X)), in the reference's order of operations.

    X [Dk, Dv], k [Dk], kX [Dv] scratch (receives k^T X).
    """
    Dk, Dv = X.shape
    kX[:] = 0.0
    for a in range(Dk):
        for b in range(Dv):
            kX[b] += k[a] * X[a, b]
    rank_one_update(X, k, kX, alpha, beta)


@njit(cache=True)
def rank_one_update(X, k, kX, alpha, beta):
    """X <- alpha (X - beta k kX^T), with kX = k^T X given.   X [Dk, Dv]"""
    Dk, Dv = X.shape
    for a in range(Dk):
        for b in range(Dv):
            X[a, b] = alpha * (X[a, b] - beta * (k[a] * kX[b]))


# --- 2. information score, from three scalars ------------------------------------


@njit(cache=True)
def information_score(S_open, k, v, beta, state_score, normalize, eps, terms):
    """I_t = ||R(A) - R(B)||_F / (||R(B)||_F + eps), B = S_open, in float64.

    A = s_t = beta_t k_t v_t^T (score="token") or S_open + s_t (score="state");
    R(X) = X / sqrt(mean(X^2) + eps) over all Dk*Dv entries if ``normalize``, else the
    identity. S_open [Dk, Dv] is the open state after the transition; the caller
    handles the empty cache (I_0 := 0).
    """
    ss, SS, sS = score_terms(S_open, k, v, beta, terms)
    return score_from_scalars(ss, SS, sS, S_open.size, state_score, normalize, eps)


@njit(cache=True)
def score_terms(S_open, k, v, beta, terms):
    """(||s||^2, ||S||^2, <S, s>) for s = beta k v^T, S = S_open, in float64.

    ||s||^2 = beta^2 ||k||^2 ||v||^2 and <S, s> = beta k^T S v need no s. The sums
    over Dk run per column (terms [2, Dv] scratch: column sums of S*S and of k S),
    which keeps the inner loop free of a reduction and so vectorizable.
    """
    Dk, Dv = S_open.shape
    terms[:] = 0.0
    for a in range(Dk):
        ka = np.float64(k[a])
        for b in range(Dv):
            x = np.float64(S_open[a, b])
            terms[0, b] += x * x
            terms[1, b] += ka * x
    SS, kSv, kk, vv = 0.0, 0.0, 0.0, 0.0
    for b in range(Dv):
        vb = np.float64(v[b])
        SS += terms[0, b]
        kSv += terms[1, b] * vb
        vv += vb * vb
    for a in range(Dk):
        kk += np.float64(k[a]) * np.float64(k[a])
    bt = np.float64(beta)
    return bt * bt * kk * vv, SS, bt * kSv


@njit(cache=True)
def score_from_scalars(ss, SS, sS, size, state_score, normalize, eps):
    """I_t from ||s||^2, ||S||^2, <S, s>: ``dla_ref.step.information_score_from_scalars``.

    With r_X = 1 / sqrt(||X||^2 / size + eps) (1 without normalization), the squared
    numerator is, for score="token" (A = s),
        r_A^2 ||s||^2 - 2 r_A r_B <S, s> + r_B^2 ||S||^2        (rounds below 0 -> 0)
    and for score="state" (A = S + s), with P = ||A||^2 - ||S||^2 = 2 <S, s> + ||s||^2
    and d = r_A - r_B = -(P / size) r_A^2 r_B^2 / (r_A + r_B), free of cancellation:
        d^2 ||S||^2 + 2 d r_A <S, s> + r_A^2 ||s||^2.
    Normalized scores are clamped at 2 (docs/spec/information-score.md).
    """
    if state_score:
        P = max(2.0 * sS + ss, -SS)  # ||A||^2 = SS + P >= 0 despite rounding
        AA = SS + P
    else:
        AA = ss
    if normalize:
        a = 1.0 / np.sqrt(AA / size + eps)
        b = 1.0 / np.sqrt(SS / size + eps)
    else:
        a, b = 1.0, 1.0
    if state_score:
        d = -(P / size) * (a * a) * (b * b) / (a + b) if normalize else 0.0
        radicand = d * d * SS + 2.0 * d * a * sS + a * a * ss
    else:
        radicand = a * a * ss - 2.0 * a * b * sS + b * b * SS
    score = np.sqrt(max(radicand, 0.0)) / (b * np.sqrt(SS) + eps)
    return min(score, 2.0) if normalize else score


# --- 3. boundary, 5a. merge choice -----------------------------------------------


@njit(cache=True)
def is_boundary(score, m, K, tau, silent):
    """b_t = [m = 0] or [I_t >= tau] (note >=); with K = 1 only the first token opens a
    slot, and a zero contribution (``silent``) is absorbed whenever m > 0, whatever tau."""
    if m == 0:
        return True
    return K > 1 and not silent and score >= tau


@njit(cache=True)
def zero_contribution(k, v, beta):
    """s_t = beta_t k_t v_t^T is exactly zero: beta_t = 0, k_t = 0 or v_t = 0 (the
    inputs, not their product, which can underflow). k [Dk], v [Dv]."""
    return beta == 0 or not np.any(k) or not np.any(v)


@njit(cache=True)
def merge_choice(n, info, m, K, boundary):
    """The pair j to merge before a new slot opens, or -1.

    A merge happens iff b_t = 1 and the cache is full (m = K >= 2). Then
    j = argmin_{j in 0..K-2} (J_j + J_{j+1}) / (n_j + n_{j+1}), ties to the smallest j
    (the strict < below keeps the first minimum). All K slots are used, so every
    count is >= 1. The open slot K-1 takes part; the new token does not.
    """
    if not boundary or m < K or K < 2:
        return -1
    best, best_density = 0, pair_density(n, info, 0)
    for j in range(1, K - 1):
        density = pair_density(n, info, j)
        if density < best_density:
            best, best_density = j, density
    return best


@njit(cache=True)
def pair_density(n, info, j):
    """(J_j + J_{j+1}) / (n_j + n_{j+1}), divided in float64."""
    return np.float64(info[j] + info[j + 1]) / np.float64(n[j] + n[j + 1])


# --- 5a. merge, 4 / 5b. absorb or append -------------------------------------------


@njit(cache=True)
def merge_adjacent(S, order, n, info, j, m):
    """Slot j <- slot j + slot j+1; slots j+2 ... m-1 move left by one; slot m-1 is freed.

    S [K, Dk, Dv] with slot i in buffer order[i]; n, info [K] indexed by slot. Only
    the names of the buffers move: slot j+1's buffer is added into slot j's, zeroed
    (unused slots are zero) and becomes the name of the freed slot m-1.
    """
    freed = order[j + 1]
    add_into(S[order[j]], S[freed])
    S[freed] = 0.0
    n[j] += n[j + 1]
    info[j] += info[j + 1]
    for i in range(j + 1, m - 1):
        order[i], n[i], info[i] = order[i + 1], n[i + 1], info[i + 1]
    order[m - 1], n[m - 1], info[m - 1] = freed, 0, 0.0


@njit(cache=True)
def add_into(X, Y):
    """X <- X + Y.   X, Y [Dk, Dv]"""
    Dk, Dv = X.shape
    for a in range(Dk):
        for b in range(Dv):
            X[a, b] += Y[a, b]


@njit(cache=True)
def write_token(S, order, n, info, m, boundary, k, v, beta, score):
    """Absorb (b_t = 0) or append (b_t = 1) the token.   -> m after the write

    Slot m - 1 + b_t (m counted after any merge) receives (s_t, 1, I_t) by addition:
    the open slot when absorbing, a fresh zero slot when appending. s_t =
    beta_t (k_t v_t^T), in the reference's order of operations. S [K, Dk, Dv] with
    slot i in buffer order[i]; n, info [K] indexed by slot.
    """
    target = m - 1 + (1 if boundary else 0)
    X = S[order[target]]
    Dk, Dv = X.shape
    for a in range(Dk):
        for b in range(Dv):
            X[a, b] += beta * (k[a] * v[b])
    n[target] += 1
    info[target] += score
    return target + 1


# --- 6. readout, fused with the next token's transition ------------------------------


@njit(cache=True)
def readout_then_transition(q, lam, newest_first, o, S, order, m, k, alpha, beta,
                            backbone, qS, kS):
    """o_t = sum_{i<m} lambda_t[l(i)] (q_t^T S_i), then S_i <- G_{t+1} S_i, slot by slot.

    q [Dk], lam [K], o [Dv] of token t; k [Dk], alpha, beta of token t+1 (backbone
    LINEAR, G = 1, when no token follows); S [K, Dk, Dv] with slot i in buffer
    order[i]; qS, kS [Dv] scratch. l(i) = i (slots="oldest-first") or m - 1 - i
    ("newest-first").
    """
    o[:] = 0.0
    for i in range(m):
        X = S[order[i]]
        if backbone == MAMBA2:
            read_then_decay(q, X, alpha, qS)
        elif backbone == GDN:
            read_then_delta_rule(q, X, k, alpha, beta, qS, kS)
        else:
            read(q, X, qS)
        w = lam[m - 1 - i] if newest_first else lam[i]
        for b in range(o.shape[0]):
            o[b] += w * qS[b]


@njit(cache=True)
def read(q, X, qX):
    """qX <- q^T X.   q [Dk], X [Dk, Dv], qX [Dv]"""
    Dk, Dv = X.shape
    qX[:] = 0.0
    for a in range(Dk):
        for b in range(Dv):
            qX[b] += q[a] * X[a, b]


@njit(cache=True)
def read_then_decay(q, X, alpha, qX):
    """qX <- q^T X, then X <- alpha X, row by row."""
    Dk, Dv = X.shape
    qX[:] = 0.0
    for a in range(Dk):
        for b in range(Dv):
            qX[b] += q[a] * X[a, b]
            X[a, b] *= alpha


@njit(cache=True)
def read_then_delta_rule(q, X, k, alpha, beta, qX, kX):
    """qX <- q^T X and kX <- k^T X in one sweep, then X <- alpha (X - beta k kX^T)."""
    Dk, Dv = X.shape
    qX[:] = 0.0
    kX[:] = 0.0
    for a in range(Dk):
        for b in range(Dv):
            qX[b] += q[a] * X[a, b]
            kX[b] += k[a] * X[a, b]
    rank_one_update(X, k, kX, alpha, beta)


# --- the cache back in slot order --------------------------------------------------


@njit(cache=True)
def put_in_slot_order(S, order):
    """S[i] <- S[order[i]] for every slot i, so that S is indexed by slot again."""
    held = S.copy()
    for i in range(S.shape[0]):
        copy_into(S[i], held[order[i]])


@njit(cache=True)
def copy_into(X, Y):
    """X <- Y.   X, Y [Dk, Dv] (an explicit loop compiles far faster than X[:] = Y)"""
    Dk, Dv = X.shape
    for a in range(Dk):
        for b in range(Dv):
            X[a, b] = Y[a, b]


# --- decoding: one token per call, the buffers kept in their order between calls ----------


@njit(cache=True, parallel=True)
def decode_streams(q, k, v, lam, alpha, beta, S, order, n, info, m, o, scores, boundary,
                   merged, backbone, state_score, normalize, newest_first, tau, eps):
    """One token (T = 1) of every stream, in place, for dla_backends.decoder.

    As ``scan_streams`` with T = 1, except that slot i of stream s stays in buffer
    order[s, i] (order [N, K]): a merge moves K ints and no state, where putting the
    buffers back in slot order after every token would copy the whole cache twice.
    ``put_in_slot_order(S[s], order[s])`` restores slot order when the cache is read.
    """
    for i in prange(q.shape[0]):
        m[i] = scan_in_buffers(q[i], k[i], v[i], lam[i], alpha[i], beta[i], S[i], order[i],
                               n[i], info[i], m[i], o[i], scores[i], boundary[i], merged[i],
                               False, backbone, state_score, normalize, newest_first, tau,
                               eps)
