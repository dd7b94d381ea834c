"""The differentiable pieces of the DLA layer: partitions as weight masks, the masked
(quadratic) form, the information score from three scalars, and the straight-through gate.

Everything here is torch; shapes follow flash-linear-attention: q, k [B, T, H, Dk],
v [B, T, H, Dv], per-token scalars [B, T, H], readout weights lam [B, T, H, K].

Why a masked form. Under a fixed trace DLA's output is (docs/spec/materialized.md)

    o_t = sum_{s <= t} Lambda[t, s] * (q_t . k_s) * exp(c_t - c_s) * v_s,   c = cumsum(log alpha)

for the linear (log alpha = 0) and mamba2 backbones, where Lambda[t, s] = lam_t[slot
that holds token s at time t]. At the lengths a CPU trains on (T <= 1024) this is three
batched matrix products per layer, which autograd differentiates at the cost of a few
more; every policy (dla, fixed, loglinear, single) is the same product with a different
slot map, so the four models differ only in that map. The map comes from the trace, which
a no-grad scan decides (``dla_backends.dla``); decisions carry no gradient (see
docs/spec/trace.md), except through the straight-through gate below.
"""

from __future__ import annotations

import math

import numpy as np



# --- slot maps: which readout weight each (t, s) pair uses ----------------------------------


def slot_map_from_trace(boundary, merged, capacity):
    """The slot of token s at time t, replayed from a trace.   -> int64 [N, T, T] (NumPy)

    boundary [N, T] bool, merged [N, T] int (a trace from an empty cache, as streams,
    already checked to fit the capacity: it comes from a scan). slot[n, t, s] = the
    chronological slot (0 = oldest) that holds token s after token t, for s <= t;
    entries above the diagonal are 0 (``readout_mask`` masks them).
    """
    slot, _ = replay(np.ascontiguousarray(boundary, dtype=np.bool_),
                     np.ascontiguousarray(merged, dtype=np.int64), capacity)
    return slot


def open_starts(boundary, merged, capacity):
    """First token of the open slot that token s is scored against.   -> int64 [N, T]

    For s >= 1 that is the start of the newest slot after token s-1 (no merge can move
    it: a merge happens only at a boundary). Entry 0 is 0 (token 0 is not scored).
    """
    _, newest = replay(np.ascontiguousarray(boundary, dtype=np.bool_),
                       np.ascontiguousarray(merged, dtype=np.int64), capacity)
    return np.concatenate([np.zeros_like(newest[:, :1]), newest[:, :-1]], axis=1)


def replay_trace(boundary, merged, capacity):
    """Replay a trace on the slots' start tokens.  -> (slot [N, T, T], newest [N, T])

    A merge of slots j, j+1 drops start j+1 (the later slots move down by one); a
    boundary appends start t. slot[n, t, s] = (starts <= s among the used slots) - 1;
    newest[n, t] = the start of the newest slot after token t. Plain loops, compiled by
    Numba when it is installed (the reference's ``partition_history`` does the same on
    whole arrays, at Python speed per token).
    """
    N, T = boundary.shape
    slot = np.zeros((N, T, T), dtype=np.int64)
    newest = np.zeros((N, T), dtype=np.int64)
    starts = np.zeros(capacity, dtype=np.int64)
    for n in range(N):
        m = 0
        for t in range(T):
            j = merged[n, t]
            if j >= 0:
                for i in range(j + 1, m - 1):
                    starts[i] = starts[i + 1]
                m -= 1
            if boundary[n, t]:
                starts[m] = t
                m += 1
            newest[n, t] = starts[m - 1]
            i = 0
            for s in range(t + 1):
                while i + 1 < m and starts[i + 1] <= s:
                    i += 1
                slot[n, t, s] = i
    return slot, newest


def _compiled(function):
    try:
        import numba
    except ImportError:
        return function
    return numba.njit(cache=True)(function)


replay = _compiled(replay_trace)


def fenwick_slot_map(T):
    """Log-Linear's level of token s at time t: bit_length(t XOR s).   -> int64 [T, T]

    Level 0 is the current token; lam is indexed by level (docs/spec/baselines.md).
    Entries above the diagonal are 0.
    """
    t = np.arange(T)
    x = np.bitwise_xor(t[:, None], t[None, :])
    levels = sum((x >> bit) > 0 for bit in range(max(T - 1, 1).bit_length())).astype(np.int64)
    return np.where(t[:, None] >= t[None, :], levels, 0)


def fixed_trace(N, T, chunk):
    """The fixed(C) partition from an empty cache with room for every block:
    a boundary every ``chunk`` tokens, no merge.   -> (boundary [N, T], merged [N, T])"""
    boundary = np.broadcast_to(np.arange(T) % chunk == 0, (N, T)).copy()
    return boundary, np.full((N, T), -1, dtype=np.int64)


# --- the masked form --------------------------------------------------------------------------


def causal(T, device):
    """[T, T] bool, True where s <= t."""
    import torch

    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def decay_matrix(log_alpha, T, device):
    """exp(c_t - c_s) for s <= t, else 0, with c = cumsum(log alpha).   [B, H, T, T]

    log_alpha [B, T, H] or None (linear backbone: all ones below the diagonal).
    """
    import torch

    mask = causal(T, device)
    if log_alpha is None:
        return mask.to(torch.get_default_dtype())
    c = log_alpha.transpose(1, 2).cumsum(-1)  # [B, H, T]
    diff = (c[..., :, None] - c[..., None, :]).masked_fill(~mask, -math.inf)
    return diff.exp()


def readout_mask(lam, slot):
    """Lambda[t, s] = lam_t[slot[t, s]] for s <= t, else 0.   [B, H, T, T]

    lam [B, T, H, K]; slot: int64 tensor [B, H, T, T] (or broadcastable to it).
    """
    lam = lam.permute(0, 2, 1, 3)  # [B, H, T, K]
    B, H, T, _ = lam.shape
    weights = lam.gather(3, slot.expand(B, H, T, T))
    return weights * causal(T, lam.device)


def masked_attention(q, k, v, weights, decay):
    """o_t = sum_s weights[t, s] (q_t . k_s) decay[t, s] v_s.   -> [B, T, H, Dv]

    q, k [B, T, H, Dk], v [B, T, H, Dv], weights and decay [B, H, T, T] (zero above
    the diagonal).
    """
    qk = q.transpose(1, 2) @ k.permute(0, 2, 3, 1)  # [B, H, T, T]
    return ((weights * decay * qk) @ v.transpose(1, 2)).transpose(1, 2)


# --- the information score, differentiably -----------------------------------------------------


def score_scalars(k, v, log_alpha, boundary, starts):
    """The three scalars of every token's score, as functions of k, v and log alpha.

    ss_s = ||k_s||^2 ||v_s||^2;  sS_s = <S_open(s), s_s> = k_s^T S_open(s) v_s;
    SS_s = ||S_open(s)||^2, where S_open(s) = sum_{u in [starts_s, s)} exp(c_s - c_u) k_u v_u^T
    is the open state that token s is scored against (after its transition). With
    G_s = exp(c_s - c_u)(k_s . k_u)(v_s . v_u):

        sS_s = sum_{u in [starts_s, s)} G[s, u]
        SS_s = sum_{u in [starts_s, s)} exp(2 (c_s - c_u)) (ss_u + 2 [b_u = 0] sS_u)

    (unrolling ||S||^2 <- alpha^2 (||S||^2 + 2 <S, s_u> + ||s_u||^2) since the slot
    opened). k, v [B, T, H, D]; log_alpha [B, T, H] or None; boundary [B, H, T] bool;
    starts [B, H, T] int64 tensors. Returns (ss, SS, sS), each [B, H, T].
    """
    import torch

    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    T = kh.shape[2]
    decay = decay_matrix(log_alpha, T, k.device)
    u = torch.arange(T, device=k.device)
    in_open = (u[None, None, None, :] >= starts[..., None]) & (u[None, None, None, :] < u[:, None])
    gram = (kh @ kh.transpose(-1, -2)) * (vh @ vh.transpose(-1, -2))  # [B, H, T, T]
    ss = gram.diagonal(dim1=-2, dim2=-1)
    sS = (in_open * decay * gram).sum(-1)
    grow = ss + 2 * torch.where(boundary, torch.zeros_like(sS), sS)
    SS = ((in_open * decay * decay) @ grow[..., None])[..., 0]
    return ss, SS, sS


def information_score(ss, SS, sS, size, eps):
    """I_t from three scalars (score="token", normalize=True), with a gradient everywhere.

    The formula of ``dla_ref.step.information_score_from_scalars`` (docs/spec/
    information-score.md), clamped to 2 as the reference clamps it; the radicand is
    floored at eps^2 rather than 0, so that sqrt has a finite derivative where R(s_t)
    and R(S_open) coincide (the value changes by at most eps there).
    """
    import torch

    rA, rB = torch.rsqrt(ss / size + eps), torch.rsqrt(SS / size + eps)
    radicand = rA * rA * ss - 2 * rA * rB * sS + rB * rB * SS
    distance = radicand.clamp_min(eps * eps).sqrt()
    return (distance / (rB * SS.clamp_min(eps * eps).sqrt() + eps)).clamp_max(2.0)


# --- the straight-through gate ------------------------------------------------------------------


def soft_boundary(score, tau, temperature):
    """b~_t = sigmoid((I_t - tau_h) / temperature).   score [B, H, T], tau [H] -> [B, H, T]"""
    import torch

    return torch.sigmoid((score - tau[None, :, None]) / temperature)


def relaxed_readout_mask(weights, boundary, soft, soft_at, free):
    """The readout mask of the relaxed write, straight through (docs/training.md).

    Token s's contribution goes (1 - b~_s) into the slot that would absorb it (the one
    that holds token s-1) and b~_s into the slot it would open (its own, which exists in
    the hard partition only if b_s = 1; otherwise that term is dropped). Read at time t:

        Lambda~[t, s] = Lambda[t, s] + (b~_s - b~_s^0) * D[t, s]
        D[t, s] = Lambda[t, s] - Lambda[t, s-1]   if b_s = 1   (own slot minus absorber)
                = -Lambda[t, s]                   if b_s = 0   (absorber; no own slot)

    where b~^0 = ``soft_at`` is b~ at the point of evaluation (a constant), so the value
    is exactly Lambda (the hard forward) and the gradient is that of the relaxed write.
    weights [B, H, T, T] (Lambda); boundary [B, H, T] bool; soft, soft_at [B, H, T];
    free [B, H, T] bool: where the policy chose b_s (elsewhere no gradient: token 0).
    """
    import torch

    previous = torch.nn.functional.pad(weights[..., :-1], (1, 0))  # Lambda[t, s-1]
    D = torch.where(boundary[:, :, None, :], weights - previous, -weights)
    shift = torch.where(free, soft - soft_at, torch.zeros_like(soft))
    return weights + shift[:, :, None, :] * D
