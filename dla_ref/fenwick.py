"""The Log-Linear Attention baseline (Guo et al., 2025): the Fenwick partition.

At time t, token s <= t lies at level

    level(t, s) = bit_length(t XOR s)        (0 for s = t)

Level l >= 1 holds the 2^(l-1) tokens that agree with t above bit l-1 and have a 0
where t has a 1 at bit l-1; it is empty when bit l-1 of t is 0. lambda is indexed by
level: o_t = sum_l lambda_t[l] q_t^T S_l. Positions count from the stream's start.
The page: docs/spec/baselines.md.
"""

from __future__ import annotations

from ._xp import device
from .recurrent import from_streams, prepare_tokens
from .step import contribution, readout, transition
from .validation import check_options


def fenwick_levels(T: int) -> int:
    """Levels a stream of T tokens needs: 1 + bit_length(T - 1)."""
    return 1 + (T - 1).bit_length()


def level(t: int, s: int) -> int:
    """The Fenwick level of token s at time t >= s: bit_length(t XOR s)."""
    return (t ^ s).bit_length()


def carry_level(t: int) -> int:
    """The level that token t's arrival fills: 1 + trailing zeros of t (t >= 1).

    Going from t-1 to t, the states at levels 0 ... z (z = trailing zeros of t)
    merge into level z+1, which was empty, and token t takes level 0.
    """
    return (t & -t).bit_length()


def loglinear(q, k, v, lam=None, *, backbone="linear", log_alpha=None, beta=None, dtype=None):
    """Log-Linear Attention, recurrent over levels.   -> o [B, T, H, Dv]

    lam >= 0 broadcasting to [B, T, H, L] with L >= fenwick_levels(T) (columns past
    those are unused); None, or a last axis of 1, means L = fenwick_levels(T) equal
    weights. Other arguments as in ``dla_ref.dla``; o has the inputs' result dtype.
    The per-level states obey the same transition and readout as DLA's slots; only
    the partition differs.
    """
    check_options(capacity=1, tau=0.0, backbone=backbone, score="token",
                  normalize=True, slots="oldest-first", eps=1.0)
    xp, (B, T, H, Dk, Dv), tokens = prepare_tokens(q, k, v, lam, log_alpha, beta, backbone,
                                                   None, dtype)
    N, levels = B * H, fenwick_levels(T)
    lam_s = tokens.lam
    if lam_s.shape[2] == 1:  # one weight for every level
        lam_s = xp.broadcast_to(lam_s, (N, T, levels))
    if lam_s.shape[2] < levels:
        raise ValueError(f"lam must have at least {levels} columns (levels) for T={T}, "
                         f"got {lam_s.shape[2]}")
    o = level_scan(xp, tokens._replace(lam=lam_s), backbone, Dk, Dv)
    out_dtype = xp.result_type(*(x for x in (q, k, v, lam) if x is not None))
    return xp.astype(from_streams(xp, o, B, H), out_dtype)


def level_scan(xp, tokens, backbone, Dk, Dv):
    """The Fenwick recurrence over streams: tokens a ``Tokens`` record [N, T, ...],
    lam [N, T, L].   -> o [N, T, Dv]"""
    q, k, v, lam, alpha, beta = tokens
    N, T, L = lam.shape
    S = xp.zeros((N, L, Dk, Dv), dtype=q.dtype, device=device(q))
    lev = xp.reshape(xp.arange(L, device=device(q)), (1, L, 1, 1))
    outputs = []
    for t in range(T):
        a = None if alpha is None else alpha[:, t]
        b = None if beta is None else beta[:, t]
        S = transition(xp, S, k[:, t, :], a, b, backbone)
        if t > 0:
            z1 = carry_level(t)
            carried = xp.sum(xp.where(lev < z1, S, xp.zeros_like(S)), axis=1, keepdims=True)
            S = xp.where(lev < z1, xp.zeros_like(S), xp.where(lev == z1, carried, S))
        s = contribution(xp, k[:, t, :], v[:, t, :], b, backbone)
        S = xp.where(lev == 0, xp.expand_dims(s, axis=1), S)
        outputs.append(readout(xp, q[:, t, :], S, lam[:, t, :]))
    return xp.stack(outputs, axis=1)


def fenwick_mask(xp, lam):
    """Lambda[t, s] = lam_t[level(t, s)] for s <= t, else 0.   lam [N, T, L] -> [N, T, T]

    The direct definition, by integer level math, used to check ``loglinear``.
    """
    N, T, L = lam.shape
    onehot = [[[1.0 if s <= t and level(t, s) == c else 0.0 for c in range(L)]
               for s in range(T)] for t in range(T)]
    onehot = xp.asarray(onehot, dtype=lam.dtype, device=device(lam))  # [T, T, L]
    return xp.sum(onehot[None, ...] * lam[:, :, None, :], axis=3)
