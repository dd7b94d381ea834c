"""Theorem 3.1 of the paper: how much a partition into blocks can cost a readout.

Token contributions u_t (vectors; flatten a d_k x d_v contribution to d_k*d_v),
a partition pi of 0 ... T-1 into contiguous blocks C_i (given by their start
tokens), block representatives u_bar_i = the block means, and weights |w_t| <= 1:

    y(q)      = sum_t w_t <q, u_t>
    y~_pi(q)  = sum_i sum_{t in C_i} w_t <q, u_bar_i>
    |y - y~|  <= ||q||_2 * sum_i sqrt(|C_i|) * sqrt(sum_{t in C_i} ||u_t - u_bar_i||^2)

``deviation`` is the left side (worst case over the weights when none are given:
w_t = sign <q, u_t - u_bar>), ``deviation_bound`` the right side. The derivation and its
checks: proofs/theorem_3_1.md, linked from docs/index.md's "Theory".
"""

from __future__ import annotations

from ._xp import array_namespace, device


def block_index(xp, T, starts, dev=None):
    """Block of each token: [T] int. starts: [M] int, strictly increasing, starts[0] = 0."""
    starts = xp.asarray(starts, device=dev)
    if starts.ndim != 1 or starts.shape[0] < 1:
        raise ValueError("starts must be a non-empty 1-d array of block start tokens")
    if int(starts[0]) != 0:
        raise ValueError("starts[0] must be 0: the first block starts at token 0")
    if starts.shape[0] > 1 and not bool(xp.all(starts[1:] > starts[:-1])):
        raise ValueError("starts must be strictly increasing")
    if int(starts[-1]) >= T:
        raise ValueError(f"starts must lie in [0, T={T})")
    t = xp.arange(T, dtype=starts.dtype, device=dev)
    return xp.sum(xp.astype(starts[None, :] <= t[:, None], xp.int64), axis=1) - 1


def block_residuals(u, starts):
    """(u_t - u_bar_{block(t)}, block one-hot [T, M]) for u [T, D]."""
    xp = array_namespace(u)
    if u.ndim != 2:
        raise ValueError(f"u must have shape [T, D], got {list(u.shape)}")
    T = u.shape[0]
    block = block_index(xp, T, starts, device(u))
    M = int(xp.max(block)) + 1
    slots = xp.arange(M, dtype=block.dtype, device=device(u))
    onehot = xp.astype(block[:, None] == slots[None, :], u.dtype)
    means = xp.matmul(xp.matrix_transpose(onehot), u) / xp.sum(onehot, axis=0)[:, None]
    return u - xp.matmul(onehot, means), onehot


def deviation_bound(u, starts, q=None):
    """||q|| * sum_i sqrt(|C_i|) * sqrt(sum_{t in C_i} ||u_t - u_bar_i||^2)  (||q|| = 1 if None).

    u [T, D] float, starts [M] int (block starts, starts[0] = 0), q [D] or None.
    """
    xp = array_namespace(u)
    resid, onehot = block_residuals(u, starts)
    sq = xp.matmul(xp.matrix_transpose(onehot), xp.sum(resid * resid, axis=1)[:, None])[:, 0]
    bound = xp.sum(xp.sqrt(xp.sum(onehot, axis=0)) * xp.sqrt(sq))
    return bound if q is None else bound * xp.linalg.vector_norm(q)


def deviation(u, starts, q, w=None):
    """|y(q) - y~_pi(q)| = |sum_t w_t <q, u_t - u_bar_{block(t)}>|.

    u [T, D], starts [M], q [D], w [T] with |w_t| <= 1, or None for the worst case
    max_{|w| <= 1} = sum_t |<q, u_t - u_bar>|.
    """
    xp = array_namespace(u)
    resid, _ = block_residuals(u, starts)
    per_token = xp.matmul(resid, q[:, None])[:, 0]
    if w is None:
        return xp.sum(xp.abs(per_token))
    if not bool(xp.all(xp.abs(w) <= 1)):
        raise ValueError("w must satisfy |w_t| <= 1")
    return xp.abs(xp.sum(w * per_token))
