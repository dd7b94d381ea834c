"""DLA's gradient compiled with Numba: the adjoint scan of ``dla_ref.vjp``, parallel over streams.

Two passes, both compiled and run in parallel over the N = B*H streams (``prange``):

- ``forward``: the compiled forward scan of ``numba_scan`` (``scan_stream``), run C tokens
  at a time, keeping the cache before every chunk (a checkpoint: S [K, Dk, Dv] in slot
  order and m). A run of chunks is the same computation as one run (the split-sequence
  property of ``dla``), so the outputs and trace are numba_scan's.
- ``backward``: per stream, chunk by chunk from the last: recompute the C + 1 caches of the
  chunk from its checkpoint under the trace, then run the adjoint of each step from the
  chunk's last token to its first (``step_adjoint``, the compiled ``dla_ref.adjoint``).
  Memory per stream: T/C checkpoints + C + 1 recomputed caches of K Dk Dv each;
  C = ceil(sqrt(T)) by default.

The equations are those of ``dla_ref/adjoint.py`` (docs/spec/gradient.md); what differs
from the reference, and why:

- The state and the adjoints are in the input dtype (float32 or float64); the scalar
  adjoints d alpha and d beta are summed over slots in float64.
- Only used slots are read or written: the reference's unused slots are zero and receive
  zero adjoint (dla_ref.adjoint.step_adjoint masks them); here they are never touched,
  so the recomputed caches hold stale values there, which nothing reads.
- The slot adjoints live in buffers named by ``order`` (as numba_scan keeps its states):
  the merge's adjoint renames the later slots' buffers and copies one slot, instead of
  moving up to K - 1. The recompute writes each transitioned slot straight into its
  merged position.

Versions (the shipped one is the tested one):
- v1 (commit 5f54d46): a direct port of dla_ref.adjoint, one sweep per adjoint.
- v2 (commit 5f199b5): token t+1's transition adjoint and token t's readout adjoint in one
  sweep per slot; the adjoint's reductions reassociated, so that they vectorize.
- v3 (this file, shipped): slot adjoints in named buffers; a merge's adjoint copies one slot.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat.numpy as xp_numpy
import numpy as np
from numba import njit, prange

from dla_ref.records import Result
from dla_ref.recurrent import from_streams
from dla_ref.validation import check_float_array
from dla_ref.vjp import Gradients, checkpoint_interval

from .. import host
from .numba_scan import (BACKBONE_CODE, GDN, LINEAR, MAMBA2, copy_into, put_in_slot_order,
                         scan_stream)


class Saved(NamedTuple):
    """What ``backward`` needs from ``forward``: streams [N, ...] and the checkpoints.

    tokens (q, k, v, lam, alpha, beta) [N, T, ...] (alpha, beta = 1 where the backbone
    has none); boundary, merged [N, T]; ckS [N, T/C, K, Dk, Dv], ckm [N, T/C]: the
    cache before tokens 0, C, 2C, ...; C; the options; B, H.
    """

    tokens: tuple
    boundary: Any
    merged: Any
    ckS: Any
    ckm: Any
    C: int
    opts: Any
    B: int
    H: int


def forward(q, k, v, lam, *, checkpoint=None, **options) -> tuple[Result, Saved]:
    """``numba_scan.dla`` (same keywords, checks and result) that also keeps checkpoints.

    NumPy inputs (others are converted by ``host``); the state is in the inputs' dtype
    (float32 or float64). checkpoint: C, the distance between kept caches (default
    ceil(sqrt(T))). Returns (Result, Saved).
    """
    call = host.prepare(q, k, v, lam, backend="numba", **options)
    (N, T), dtype, opts = call.streams, call.state_dtype, call.opts
    tokens = tuple(np.ones((N, T), dtype) if x is None else np.ascontiguousarray(x)
                   for x in call.tokens)  # alpha = 1, beta = 1 where the backbone has none
    S, n, info, m = (np.ascontiguousarray(x) for x in call.cache)
    if call.forced is None:
        boundary, merged = np.zeros((N, T), np.bool_), np.full((N, T), -1, np.int64)
    else:
        boundary, merged = call.forced
    C = checkpoint_interval(T, checkpoint)
    ckS = np.empty((N, -(-T // C)) + S.shape[1:], dtype)
    ckm = np.empty((N, -(-T // C)), np.int64)
    o, scores = np.empty((N, T, tokens[2].shape[2]), dtype), np.empty((N, T), dtype)
    scan_checkpointed(*tokens, S, n, info, m, o, scores, boundary, merged,
                      call.forced is not None, BACKBONE_CODE[opts.backbone],
                      opts.score == "state", opts.normalize, opts.slots == "newest-first",
                      opts.tau, opts.eps, C, ckS, ckm)
    result = host.finish(call, host.Launched(o, (S, n, info, m), (scores, boundary, merged)))
    B, _, H, _, _ = call.shape
    return result, Saved(tokens, boundary, merged, ckS, ckm, C, opts, B, H)


def backward(saved: Saved, do, dcache=None) -> Gradients:
    """The adjoints of the inputs of the ``forward`` that returned ``saved``.

    do [B, T, H, Dv]; dcache [B, H, K, Dk, Dv] (the final cache's S) or None; NumPy
    arrays, cast to the state dtype. Returns ``dla_ref.Gradients`` (NumPy, state dtype),
    dlog_alpha None for linear and dbeta None unless gdn.
    """
    q, k, v, lam, alpha, beta = saved.tokens
    N, T = q.shape[:2]
    K, Dk, Dv = saved.ckS.shape[2:]
    B, H, dtype = saved.B, saved.H, q.dtype
    check_float_array(xp_numpy, "do", do, (B, T, H, Dv))
    do = np.ascontiguousarray(np.swapaxes(do, 1, 2).reshape(N, T, Dv), dtype=dtype)
    if dcache is None:
        dS = np.zeros((N, K, Dk, Dv), dtype)
    else:
        check_float_array(xp_numpy, "dcache", dcache, (B, H, K, Dk, Dv))
        dS = np.array(np.reshape(dcache, (N, K, Dk, Dv)), dtype=dtype, order="C")
    grads = [np.zeros_like(x) for x in (q, k, v, lam, alpha, beta)]
    backbone = BACKBONE_CODE[saved.opts.backbone]
    backward_streams(q, k, v, lam, alpha, beta, saved.boundary, saved.merged, saved.ckS,
                     saved.ckm, do, dS, saved.C, backbone,
                     saved.opts.slots == "newest-first", *grads)
    dq, dk, dv, dlam, dlog_alpha, dbeta = (from_streams(xp_numpy, x, B, H) for x in grads)
    return Gradients(dq, dk, dv, dlam, None if backbone == 0 else dlog_alpha,
                     dbeta if backbone == GDN else None, dS.reshape(B, H, K, Dk, Dv))


def vjp(q, k, v, lam, do, *, trace, dcache=None, checkpoint=None, **options) -> Gradients:
    """``dla_ref.vjp`` compiled: forward under ``trace``, then ``backward``."""
    if trace is None:
        raise ValueError("trace is required: the gradient of DLA is defined under a fixed "
                         "trace (pass dla(...).trace)")
    _, saved = forward(q, k, v, lam, trace=trace, checkpoint=checkpoint, **options)
    return backward(saved, do, dcache)


# --- forward: numba_scan's scan, C tokens at a time ------------------------------------


@njit(cache=True, parallel=True)
def scan_checkpointed(q, k, v, lam, alpha, beta, S, n, info, m, o, scores, boundary, merged,
                      forced, backbone, state_score, normalize, newest_first, tau, eps, C,
                      ckS, ckm):
    """numba_scan.scan_streams, chunk by chunk: ckS[i, c], ckm[i, c] = stream i's cache
    before token cC (S in slot order, which ``scan_stream`` restores at its end)."""
    T = q.shape[1]
    for i in prange(q.shape[0]):
        mi = m[i]
        for c in range(ckS.shape[1]):
            t0, t1 = c * C, min(c * C + C, T)
            copy_slots(ckS[i, c], S[i], mi)  # the unused slots are never read
            ckm[i, c] = mi
            mi = scan_stream(q[i, t0:t1], k[i, t0:t1], v[i, t0:t1], lam[i, t0:t1],
                             alpha[i, t0:t1], beta[i, t0:t1], S[i], n[i], info[i], mi,
                             o[i, t0:t1], scores[i, t0:t1], boundary[i, t0:t1],
                             merged[i, t0:t1], forced, backbone, state_score, normalize,
                             newest_first, tau, eps)
        m[i] = mi


# --- backward: per stream, chunk by chunk from the last ----------------------------------

# The adjoint kernels may reassociate sums (so that LLVM vectorizes the reductions):
# they make no decision, and a gradient's rounding does not depend on a fixed order.
REASSOC = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, parallel=True)
def backward_streams(q, k, v, lam, alpha, beta, boundary, merged, ckS, ckm, do, dS, C,
                     backbone, newest_first, dq, dk, dv, dlam, dlog_alpha, dbeta):
    """``backward_stream`` for every stream, in parallel. dS [N, K, Dk, Dv]: in, the
    final cache's adjoint; out, the initial cache's. The d* outputs are [N, T, ...]."""
    for i in prange(q.shape[0]):
        backward_stream(q[i], k[i], v[i], lam[i], alpha[i], beta[i], boundary[i], merged[i],
                        ckS[i], ckm[i], do[i], dS[i], C, backbone, newest_first, dq[i],
                        dk[i], dv[i], dlam[i], dlog_alpha[i], dbeta[i])


@njit(cache=True)
def backward_stream(q, k, v, lam, alpha, beta, boundary, merged, ckS, ckm, do, dS, C,
                    backbone, newest_first, dq, dk, dv, dlam, dlog_alpha, dbeta):
    """One stream, t = T-1 ... 0, on the caches recomputed chunk by chunk.

    Token arrays [T, ...]; ckS [T/C, K, Dk, Dv], ckm [T/C] the checkpoints; dS [K, Dk, Dv]
    the adjoint of the cache after token T-1, replaced by that of the initial cache.
    The adjoint of token t+1's transition and that of token t's readout read the same
    states (the cache after token t), so they run in one sweep (``read_transition_adjoint``);
    the write and merge adjoints of token t follow. Token 0's transition is left at the end.
    """
    T = q.shape[0]
    K, Dk, Dv = dS.shape
    last = ckS.shape[0] - 1
    states = np.empty((C + 1, K, Dk, Dv), dS.dtype)
    ms = np.empty(C + 1, np.int64)
    scratch = np.empty((3, max(Dk, Dv)), dS.dtype)
    order = np.arange(K)  # slot i's adjoint is held by buffer order[i] of dS
    clear_slots(dS, final_m(ckm[last], boundary, merged, last * C, T), K)
    for c in range(last, -1, -1):
        t0, t1 = c * C, min(c * C + C, T)
        recompute(states, ms, ckS[c], ckm[c], k[t0:t1], v[t0:t1], alpha[t0:t1], beta[t0:t1],
                  boundary[t0:t1], merged[t0:t1], backbone, scratch[0])
        for t in range(t1 - 1, t0 - 1, -1):
            u = min(t + 1, T - 1)  # the next token, whose transition's adjoint is pending
            pending = backbone if t + 1 < T else LINEAR  # none after the last token
            da, db = read_transition_adjoint(states[t - t0 + 1], ms[t - t0 + 1], dS, order, True,
                                             q[t], lam[t], do[t], newest_first, k[u],
                                             alpha[u], beta[u], pending, dq[t], dk[u],
                                             dlam[t], scratch)
            if t + 1 < T:
                dlog_alpha[u] = alpha[u] * da
                dbeta[u] += db
            dbeta[t] = write_merge_adjoint(dS, order, ms[t - t0], ms[t - t0 + 1], k[t], v[t],
                                           beta[t], boundary[t], merged[t], backbone == GDN,
                                           dk[t], dv[t])
    da, db = read_transition_adjoint(ckS[0], ckm[0], dS, order, False, q[0], lam[0], do[0],
                                     newest_first, k[0], alpha[0], beta[0], backbone,
                                     scratch[0], dk[0], lam[0], scratch)
    dlog_alpha[0] = alpha[0] * da
    dbeta[0] += db
    put_in_slot_order(dS, order)


@njit(cache=True)
def final_m(m, boundary, merged, t0, T):
    """The slot count after token T-1, from the count m before token t0."""
    for t in range(t0, T):
        m += (1 if boundary[t] else 0) - (1 if merged[t] >= 0 else 0)
    return m


@njit(cache=True)
def clear_slots(dS, m, K):
    """dS_i <- 0 for the unused slots i >= m (they hold no state; see the module notes)."""
    for i in range(m, K):
        fill(dS[i], 0.0)


# --- the recompute: the chunk's caches, under the trace, in slot order ---------------------


@njit(cache=True)
def recompute(states, ms, S, m, k, v, alpha, beta, boundary, merged, backbone, kX):
    """states[0], ms[0] = (S, m); states[s + 1], ms[s + 1] = the cache after chunk token s."""
    copy_slots(states[0], S, m)
    ms[0] = m
    for s in range(k.shape[0]):
        ms[s + 1] = forward_step(states[s], ms[s], states[s + 1], k[s], v[s], alpha[s],
                                 beta[s], boundary[s], merged[s], backbone, kX)


@njit(cache=True)
def copy_slots(Y, X, m):
    """Y_i <- X_i for the m used slots."""
    for i in range(m):
        copy_into(Y[i], X[i])


@njit(cache=True)
def fill(X, value):
    """X <- value for a C-contiguous X (an explicit loop: numba's slice fill is slower)."""
    flat = X.reshape(-1)
    for a in range(flat.size):
        flat[a] = value


@njit(cache=True)
def forward_step(S0, m0, S1, k, v, alpha, beta, boundary, merged, backbone, kX):
    """S1 <- the cache after the token, from S0 (before), under (boundary, merged).  -> m

    Slot i < m0 of S0 is transitioned straight into its slot after the merge (i, or
    i - 1 past the merged pair, slot j + 1 added into j); then s = beta k v^T is written
    into slot m - 1 + b. Slots of S1 at or past the returned m are not written.
    """
    for i in range(m0):
        dest = i if (merged < 0 or i <= merged) else i - 1
        add = merged >= 0 and i == merged + 1
        if backbone == GDN:
            delta_rule_into(S1[dest], S0[i], k, alpha, beta, add, kX)
        else:
            # alpha * 0 + 1 keeps the state dtype (a float literal would make it float64)
            scale_into(S1[dest], S0[i], alpha if backbone == MAMBA2 else alpha * 0 + 1, add)
    m = m0 - (1 if merged >= 0 else 0)
    target = m - 1 + (1 if boundary else 0)
    X = S1[target]
    Dk, Dv = X.shape
    for a in range(Dk):
        for b in range(Dv):
            s = beta * (k[a] * v[b])
            X[a, b] = s if boundary else X[a, b] + s
    return target + 1


@njit(cache=True)
def scale_into(Y, X, alpha, add):
    """Y <- alpha X, or Y += alpha X if ``add``.   X, Y [Dk, Dv]"""
    Dk, Dv = X.shape
    if add:
        for a in range(Dk):
            for b in range(Dv):
                Y[a, b] += alpha * X[a, b]
    else:
        for a in range(Dk):
            for b in range(Dv):
                Y[a, b] = alpha * X[a, b]


@njit(cache=True)
def delta_rule_into(Y, X, k, alpha, beta, add, kX):
    """Y <- alpha (X - beta k (k^T X)), or Y += that if ``add``.   kX [>= Dv] scratch"""
    Dk, Dv = X.shape
    kX[:Dv] = 0.0
    for a in range(Dk):
        for b in range(Dv):
            kX[b] += k[a] * X[a, b]
    for a in range(Dk):
        for b in range(Dv):
            g = alpha * (X[a, b] - beta * (k[a] * kX[b]))
            Y[a, b] = Y[a, b] + g if add else g


# --- the adjoints -------------------------------------------------------------------------


@njit(cache=True, fastmath=REASSOC)
def read_transition_adjoint(S, m, dS, order, read, q, lam, do, newest_first, k1, alpha1,
                            beta1, backbone1, dq, dk1, dlam, scratch):
    """The adjoint of token t+1's transition, then of token t's readout, slot by slot.

    S, m: the cache after token t (= before token t+1); dS [K, Dk, Dv] (slot i in buffer
    order[i]): in, the adjoint of the cache after token t+1's transition (slots >= m
    zero); out, that of the cache
    after token t's write, readout included. With ``read`` False only the transition's
    adjoint is taken (token 0's, on the initial cache). For slot i < m, with D = dS_i:

        transition (dla_ref.adjoint.transition_adjoint, G of token t+1):
            mamba2: d alpha += <D, S_i>, D <- alpha D
            gdn:    u = S_i^T k, g = D^T k; d alpha += <D, S_i> - beta g.u,
                    d beta -= alpha g.u, dk -= alpha beta (D u + S_i g),
                    D <- alpha (D - beta k g^T)
        readout (dla_ref.adjoint.readout_adjoint, token t):
            dq += w_i S_i do, dlam[l(i)] = q^T S_i do, D += w_i q do^T

    Returns (d alpha, d beta) of token t+1; writes dq, dlam (token t) and adds to dk1.
    """
    if read:
        fill(dq, 0.0)
        fill(dlam, 0.0)
    dalpha, dbeta = 0.0, 0.0
    u, g = scratch[1], scratch[2]
    for i in range(m):
        col = m - 1 - i if newest_first else i
        w = lam[col] if read else lam[col] * 0  # in lam's dtype, so the sweep stays in it
        if backbone1 == GDN:
            gu = column_products(S[i], dS[order[i]], k1, u, g)
            dalpha -= beta1 * gu
            dbeta -= alpha1 * gu
        inner, dw = slot_sweep(S[i], dS[order[i]], q, do, w, k1, alpha1, beta1, u, g,
                               backbone1, dq, dk1)
        dalpha += inner
        if read:
            dlam[col] = dw
    return dalpha, dbeta


@njit(cache=True, fastmath=REASSOC)
def column_products(X, D, k, u, g):
    """u <- X^T k, g <- D^T k (both [Dv]); returns g . u."""
    Dk, Dv = X.shape
    u[:Dv] = 0.0
    g[:Dv] = 0.0
    for a in range(Dk):
        for b in range(Dv):
            u[b] += X[a, b] * k[a]
            g[b] += D[a, b] * k[a]
    gu = 0.0
    for b in range(Dv):
        gu += np.float64(g[b]) * np.float64(u[b])
    return gu


@njit(cache=True, fastmath=REASSOC)
def slot_sweep(X, D, q, do, w, k, alpha, beta, u, g, backbone, dq, dk):
    """One sweep over a slot: D <- G^T D + w q do^T, dq += w X do, dk (gdn).

    Returns (<D, X> before the update (0 for linear), q^T X do). u, g as
    ``column_products`` left them (gdn).
    """
    Dk, Dv = X.shape
    inner, dw = 0.0, 0.0
    for a in range(Dk):
        wq = w * q[a]
        row, sdo, acc = X[a, 0] * 0, X[a, 0] * 0, X[a, 0] * 0
        if backbone == GDN:
            bk = beta * k[a]
            for b in range(Dv):
                x, d = X[a, b], D[a, b]
                row += d * x
                sdo += x * do[b]
                acc += d * u[b] + x * g[b]
                D[a, b] = alpha * (d - bk * g[b]) + wq * do[b]
            dk[a] -= alpha * beta * acc
        elif backbone == MAMBA2:
            for b in range(Dv):
                x, d = X[a, b], D[a, b]
                row += d * x
                sdo += x * do[b]
                D[a, b] = alpha * d + wq * do[b]
        else:
            for b in range(Dv):
                sdo += X[a, b] * do[b]
                D[a, b] += wq * do[b]
        inner += row
        dq[a] += w * sdo
        dw += q[a] * sdo
    return inner, dw


@njit(cache=True, fastmath=REASSOC)
def write_merge_adjoint(dS, order, m0, m3, k, v, beta, boundary, merged, gdn, dk, dv):
    """The adjoints of token t's write, contribution and merge.   -> d beta (write)

    m0 / m3: slots in use before / after the token. ds = dS_target (target = m - 1 + b,
    m after the merge); dk = beta ds v and dv = beta ds^T k are written (dla_ref.adjoint.
    contribution_adjoint); then the merge's adjoint copies dS_j into slot j + 1 and moves
    the later slots right (``merge_adjoint``); the slots unused before the token are
    cleared. Returns k^T ds v (gdn; else 0).
    """
    m2 = m0 - (1 if merged >= 0 else 0)
    ds = dS[order[m2 - 1 + (1 if boundary else 0)]]
    Dk, Dv = ds.shape
    fill(dv, 0.0)
    dbeta = 0.0
    for a in range(Dk):
        acc = ds[a, 0] * 0
        for b in range(Dv):
            acc += ds[a, b] * v[b]
            dv[b] += beta * (ds[a, b] * k[a])
        dk[a] = beta * acc
        dbeta += np.float64(k[a]) * np.float64(acc)
    if merged >= 0:
        merge_adjoint(dS, order, merged, m0)
    for i in range(m0, m3):
        fill(dS[order[i]], 0.0)
    return dbeta if gdn else 0.0


@njit(cache=True)
def merge_adjoint(dS, order, j, m0):
    """dS_{j+1} <- a copy of dS_j, dS_i <- dS_{i-1} for i > j+1 (dla_ref.adjoint.merge_adjoint).

    The cache is full (m0 = K). Slot i's adjoint is held by buffer order[i]: the later
    slots move by renaming their buffers, and the buffer of slot K-1, whose adjoint the
    merge drops, receives the copy. One slot is copied, not up to K - 1.
    """
    freed = order[m0 - 1]
    for i in range(m0 - 1, j + 1, -1):
        order[i] = order[i - 1]
    order[j + 1] = freed
    copy_into(dS[freed], dS[order[j]])
