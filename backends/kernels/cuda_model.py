"""A NumPy model of the CUDA kernel backends/kernels/cuda/dla_scan.cu ("cuda-model").

The CPU cannot run the kernel, so this module runs its index math instead: one block
per stream, BLOCK threads each owning a fixed set of entries of the Dk x Dv state, the
same per-thread order of additions, the same shared-memory tree reduction, the same
column sums over row groups and the same single writer (thread 0) of every decision.
The functions carry the names of the kernel's device functions (owner, block_sum_pair,
column_total, contribution, transition, information_score, decide, merge_adjacent,
write_token, readout): read them side by side with the .cu file; change one, change the
other. Every block and every thread is an array axis; only the token loop, the slot
loops, a thread's serial loops and the reduction levels are Python loops. Arithmetic is
in the state dtype, in the kernel's order (nvcc's fused multiply-adds aside, so the model
and the kernel agree to rounding, not bit for bit). The host side is ``dla_backends.host``;
``one_token`` is shared with ``cupy_kernels``. The thread layout and what the model can
and cannot prove: docs/cuda.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dla_backends import host
from dla_ref.records import Trace

BLOCK = 1024  # threads per block; dla_scan.cu is compiled with -DDLA_BLOCK=BLOCK (cupy_kernels)

__all__ = ["BLOCK", "decode_step", "dla", "launch", "one_token"]


def dla(q, k, v, lam=None, **options):
    """``dla_ref.dla`` (same keywords, same result) computed by the model of the kernel.
    The state is kept in the inputs' dtype (float32 or float64)."""
    return host.run(launch, q, k, v, lam, backend="cuda-model", **options)


def decode_step(q, k, v, lam, cache, **options):
    """One token of every stream, continuing ``cache``: the kernel launched with T = 1.

    q, k [B, H, Dk], v [B, H, Dv], lam [B, H, K], log_alpha / beta [B, H]; options as
    ``dla``. Returns Result(o [B, H, Dv], cache, trace with [B, H] fields).
    """
    return one_token(dla, q, k, v, lam, cache, **options)


def one_token(dla, q, k, v, lam, cache, *, log_alpha=None, beta=None, trace=None, **options):
    """``dla`` on a single token: inputs [B, H, ...] get a T axis of 1 and lose it after."""
    token = lambda x: None if x is None else x[:, None, ...]  # noqa: E731
    if trace is not None:
        trace = Trace(*(token(x) for x in trace))
    result = dla(token(q), token(k), token(v), token(lam), log_alpha=token(log_alpha),
                 beta=token(beta), trace=trace, initial_cache=cache, **options)
    return result._replace(o=result.o[:, 0], trace=Trace(*(x[:, 0] for x in result.trace)))


# --- the model of dla_scan.cu ------------------------------------------------------------


class Owner(NamedTuple):
    """Which entries each thread of a block owns (``Owner`` in dla_scan.cu), for all threads.

    C = min(Dv, BLOCK) column lanes, G = BLOCK // C row groups; thread tid has
    lane = tid % C and group = tid // C, and if group < G owns the entries (a, j) with
    j = lane + c C < Dv and a = group + r G < Dk. cols [BLOCK, Rc] and rows [BLOCK, Rr]
    list them in the thread's visiting order, -1 where it owns nothing.
    """

    C: int
    G: int
    group: np.ndarray  # [BLOCK]
    cols: np.ndarray   # [BLOCK, Rc]
    rows: np.ndarray   # [BLOCK, Rr]


def owner(Dk, Dv):
    """The ownership of every thread (dla::Owner, built for each tid at once)."""
    C = min(Dv, BLOCK)
    G = BLOCK // C
    tid = np.arange(BLOCK)
    lane, group = tid % C, tid // C
    first_col = np.where(group < G, lane, Dv)
    first_row = np.where(group < G, group, Dk)
    cols = first_col[:, None] + C * np.arange(-(-Dv // C))[None, :]
    rows = first_row[:, None] + G * np.arange(-(-Dk // G))[None, :]
    return Owner(C, G, group, np.where(cols < Dv, cols, -1), np.where(rows < Dk, rows, -1))


def gather(x, index):
    """x[..., index] with 0 where index = -1 (what a thread reads of its own entries)."""
    return np.where(index >= 0, x[..., np.maximum(index, 0)], 0).astype(x.dtype)


def to_threads(S, own):
    """The cache's S [N, K, Dk, Dv] in thread layout [N, K, BLOCK, Rc, Rr]."""
    rows, cols = own.rows[:, None, :], own.cols[:, :, None]
    owned = (rows >= 0) & (cols >= 0)
    picked = S[:, :, np.maximum(rows, 0), np.maximum(cols, 0)]
    return np.where(owned, picked, 0).astype(S.dtype)


def from_threads(S_threads, own, Dk, Dv):
    """Thread layout back to [N, K, Dk, Dv]; every entry has exactly one owner."""
    rows = np.broadcast_to(own.rows[:, None, :], S_threads.shape[2:])
    cols = np.broadcast_to(own.cols[:, :, None], S_threads.shape[2:])
    owned = (rows >= 0) & (cols >= 0)
    S = np.zeros(S_threads.shape[:2] + (Dk, Dv), S_threads.dtype)
    S[:, :, rows[owned], cols[owned]] = S_threads[:, :, owned]
    return S


def thread_sum(x):
    """Each thread's serial sum over the entries it owns, columns outer, rows inner.

    x [..., BLOCK, Rc, Rr] -> [..., BLOCK] (``partial += ...`` in the kernel's loops).
    """
    acc = np.zeros(x.shape[:-2], x.dtype)
    for c in range(x.shape[-2]):
        for r in range(x.shape[-1]):
            acc = acc + x[..., c, r]
    return acc


def block_sum_pair(x, y):
    """Both block totals of (x, y) [N, BLOCK] -> [N], [N], by the kernel's tree.

    At each level (stride BLOCK/2, ..., 1) thread tid < stride adds the partial of
    tid + stride: red[:stride] += red[stride:2 stride].
    """
    red = np.stack([x, y], axis=1)  # [N, 2, BLOCK]: red[tid] and red[DLA_BLOCK + tid]
    stride = BLOCK // 2
    while stride > 0:
        red[..., :stride] = red[..., :stride] + red[..., stride:2 * stride]
        stride //= 2
    return red[:, 0, 0], red[:, 1, 0]


def column_total(partial, own, Dv):
    """Column sums from the threads' partials over their rows, returned to every owner.

    partial [..., BLOCK, Rc] (a thread's sum over its rows of column cols[tid, c]) is
    stored as col[..., group, j] (``col[own.group * Dv + j] = partial``), the row groups
    are added in the order g = 0 ... G-1 (``column_total``), and each owner reads its
    columns' totals back: [..., BLOCK, Rc] (0 where it owns no column).
    """
    owned = own.cols >= 0
    groups = np.broadcast_to(own.group[:, None], owned.shape)
    col = np.zeros(partial.shape[:-2] + (own.G, Dv), partial.dtype)
    col[..., groups[owned], own.cols[owned]] = partial[..., owned]
    total = np.zeros(partial.shape[:-2] + (Dv,), partial.dtype)
    for g in range(own.G):
        total = total + col[..., g, :]
    return total, gather(total, own.cols)


def contribution(k_rows, v_cols, beta, backbone):
    """s_t[a, j] = k_a v_j (times beta_t for gdn), on the owned entries: [N, BLOCK, Rc, Rr]."""
    s = k_rows * v_cols
    return beta[:, None, None, None] * s if backbone == "gdn" else s


def transition(S, m, k_rows, alpha, beta, own, opts, Dv):
    """S_i <- G_t S_i for the used slots i < m (``transition``).

    mamba2: alpha S_i per entry; gdn: alpha (S_i - beta k (k^T S_i)), where k^T S_i is
    each owner's serial sum over its rows, combined by ``column_total``.
    S [N, K, BLOCK, Rc, Rr]; m [N]; k_rows [N, BLOCK, 1, Rr]; alpha, beta [N].
    """
    if opts.backbone == "linear":
        return S
    used = (np.arange(S.shape[1])[None, :] < m[:, None])[:, :, None, None, None]
    a = alpha[:, None, None, None, None]
    if opts.backbone == "mamba2":
        return np.where(used, S * a, S)
    k = k_rows[:, None]  # [N, 1, BLOCK, 1, Rr]
    partial = np.zeros(S.shape[:-1], S.dtype)
    for r in range(S.shape[-1]):
        partial = partial + k[..., r] * S[..., r]
    _, kS = column_total(partial, own, Dv)
    updated = a * (S - beta[:, None, None, None, None] * (k * kS[..., None]))
    return np.where(used, updated, S)


def information_score(S_open, s, opts, entries):
    """I_t = ||R(A) - R(S_open)||_F / (||R(S_open)||_F + eps), two block reductions.

    S_open, s [N, BLOCK, Rc, Rr]; A = s (token) or S_open + s (state); R scales by
    1 / sqrt(sum X^2 / entries + eps) when normalizing, else by 1. -> [N]
    Normalized scores are clamped at 2 (docs/spec/information-score.md).
    """
    A = S_open + s if opts.score == "state" else s
    one = np.ones(S_open.shape[0], S_open.dtype)
    scale_A, scale_S = one, one
    if opts.normalize:
        sum_AA, sum_SS = block_sum_pair(thread_sum(A * A), thread_sum(S_open * S_open))
        scale_A = np.sqrt(sum_AA / entries + opts.eps)
        scale_S = np.sqrt(sum_SS / entries + opts.eps)
    RA = A / scale_A[:, None, None, None]
    RS = S_open / scale_S[:, None, None, None]
    sum_diff, sum_RS = block_sum_pair(thread_sum((RA - RS) * (RA - RS)), thread_sum(RS * RS))
    score = np.sqrt(sum_diff) / (np.sqrt(sum_RS) + opts.eps)
    return np.minimum(score, 2).astype(score.dtype) if opts.normalize else score


def zero_contribution(k_rows, v_cols, beta, backbone):
    """Whether s_t is exactly zero: beta_t = 0 (gdn), k_t = 0 or v_t = 0, on the inputs.

    k_rows [N, BLOCK, 1, Rr], v_cols [N, BLOCK, Rc, 1]: the threads' own rows and columns,
    which together cover k and v (``__syncthreads_or`` over the block). -> [N] bool
    """
    zero_k = ~np.any(k_rows != 0, axis=(1, 2, 3))
    zero_v = ~np.any(v_cols != 0, axis=(1, 2, 3))
    zero_beta = beta == 0 if backbone == "gdn" else np.zeros_like(zero_k)
    return zero_beta | zero_k | zero_v


def merge_adjacent(x, j):
    """Merge slot j+1 into slot j, shift the later slots left, zero slot K-1 (j < 0: none).

    x [N, K, ...]: the per-slot bookkeeping (thread 0) or the state in thread layout
    (each thread its entries), slot by slot as the kernel's loop i = j+1 ... K-2 does.
    """
    K = x.shape[1]
    j = j.reshape((-1,) + (1,) * (x.ndim - 2))
    out = x.copy()
    for i in range(K):
        following = x[:, i + 1] if i + 1 < K else np.zeros_like(x[:, i])
        out[:, i] = np.where(j == i, x[:, i] + following,
                             np.where((j >= 0) & (i > j), following, x[:, i]))
    return out


def decide(score, silent, m, n_s, info_s, forced_t, opts):
    """Thread 0 of every block: boundary, merge, and the bookkeeping of the write.

    score, silent (a zero contribution), m [N]; n_s, info_s [N, K]; forced_t =
    (boundary [N], merged [N]) or None.
    b = [m = 0] or [K > 1 and not silent and I >= tau] (tau compared in float64); if b
    and m = K >= 2,
    j = the first minimum of the pair densities, scanned upwards with strict <.
    Returns (target slot, m, b, j, n_s, info_s) after the token's write.
    """
    K = opts.capacity
    if forced_t is not None:
        b, j = forced_t
    else:
        b = (m == 0) | ((K > 1) & ~silent & (score.astype(np.float64) >= opts.tau))
        j = np.full_like(m, -1)
        if K > 1:
            best = np.zeros_like(score)
            for jj in range(K - 1):
                # every block computes it; only full caches (m = K, no empty pair) keep it
                with np.errstate(invalid="ignore", divide="ignore"):
                    density = (info_s[:, jj] + info_s[:, jj + 1]) / \
                        (n_s[:, jj] + n_s[:, jj + 1]).astype(score.dtype)
                better = (jj == 0) | (density < best)
                best = np.where(better, density, best)
                j = np.where(better, jj, j)
            j = np.where(b & (m == K), j, -1)
    n_s, info_s = merge_adjacent(n_s, j), merge_adjacent(info_s, j)
    m = m - (j >= 0)
    target = m - 1 + b
    hit = np.arange(K)[None, :] == target[:, None]
    n_s = np.where(hit, n_s + 1, n_s)
    info_s = np.where(hit, info_s + score[:, None], info_s)
    return target, m + b, b, j, n_s, info_s


def write_token(S, target, s):
    """S_target += s_t on the owned entries.

    S [N, K, BLOCK, Rc, Rr], target [N], s [N, BLOCK, Rc, Rr].
    """
    hit = (np.arange(S.shape[1])[None, :] == target[:, None])[:, :, None, None, None]
    return np.where(hit, S + s[:, None], S)


def readout(S, m, q_rows, lam, own, opts, Dv):
    """o_t[j] = sum_{i<m} w_i (q^T S_i)[j], w_i = lam[i] or lam[m-1-i]  -> [N, Dv].

    Each owner adds, slot by slot, w_i times its serial sum over rows of q_a S_i[a, j];
    ``column_total`` combines the row groups.
    """
    N, K = S.shape[:2]
    partial = np.zeros((N,) + S.shape[2:4], S.dtype)
    for i in range(K):
        column = m - 1 - i if opts.slots == "newest-first" else np.full_like(m, i)
        w = np.where(i < m, lam[np.arange(N), np.clip(column, 0, K - 1)], 0).astype(S.dtype)
        qS = np.zeros_like(partial)
        for r in range(S.shape[-1]):
            qS = qS + q_rows[..., r] * S[:, i, ..., r]
        partial = partial + w[:, None, None] * qS
    total, _ = column_total(partial, own, Dv)
    return total


def launch(call: host.Call) -> host.Launched:
    """The model of one launch of dla_scan: grid = N blocks, all emulated at once."""
    q, k, v, lam, alpha, beta = call.tokens
    S, n_s, info_s, m_s = call.cache
    opts, forced = call.opts, call.forced
    N, T, Dk = q.shape
    Dv = v.shape[2]
    dtype = S.dtype
    own = owner(Dk, Dv)
    entries = dtype.type(Dk) * dtype.type(Dv)
    S = to_threads(S, own)
    o = np.zeros((N, T, Dv), dtype)
    scores = np.zeros((N, T), dtype)
    boundary = np.zeros((N, T), bool)
    merged = np.zeros((N, T), np.int64)
    for t in range(T):
        q_rows = gather(q[:, t], own.rows)[:, :, None, :]  # [N, BLOCK, 1, Rr]
        k_rows = gather(k[:, t], own.rows)[:, :, None, :]
        v_cols = gather(v[:, t], own.cols)[:, :, :, None]  # [N, BLOCK, Rc, 1]
        alpha_t = np.ones(N, dtype) if alpha is None else alpha[:, t]
        beta_t = np.zeros(N, dtype) if beta is None else beta[:, t]

        S = transition(S, m_s, k_rows, alpha_t, beta_t, own, opts, Dv)
        s = contribution(k_rows, v_cols, beta_t, opts.backbone)
        S_open = S[np.arange(N), np.maximum(m_s - 1, 0)]
        silent = (m_s > 0) & zero_contribution(k_rows, v_cols, beta_t, opts.backbone)
        scored = (m_s > 0) & ~silent  # else I_t := 0 (empty cache, zero contribution)
        score = np.where(scored, information_score(S_open, s, opts, entries), 0).astype(dtype)
        forced_t = None if forced is None else (forced[0][:, t], forced[1][:, t])
        target, m_s, b, j, n_s, info_s = decide(score, silent, m_s, n_s, info_s, forced_t,
                                                opts)
        S = write_token(merge_adjacent(S, j), target, s)
        o[:, t] = readout(S, m_s, q_rows, lam[:, t], own, opts, Dv)
        scores[:, t], boundary[:, t], merged[:, t] = score, b, j
    return host.Launched(o, (from_threads(S, own, Dk, Dv), n_s, info_s, m_s),
                         (scores, boundary, merged))
