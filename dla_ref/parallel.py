"""The materialized O(T^2) form: a second, independent definition (docs/spec/materialized.md).

    o_t = sum_{s <= t} Lambda[t, s] * (q_t^T P_{t,s} k~_s) * v_s

P_{t,s} = G_t ... G_{s+1} (identity for s = t), k~_s = beta_s k_s for gdn else k_s,
Lambda[t, s] = lambda_t[l(i)] for the slot i that holds token s at time t.
The recurrent scan never builds Lambda or P; this form never builds a state, so
agreement between the two checks both.
"""

from __future__ import annotations

from ._xp import array_namespace, device, to_namespace
from .records import Partition, Result
from .recurrent import forced_decision, from_streams, prepare_tokens, trace_to_streams
from .step import merge_adjacent, slot_weights, write_token
from .validation import check_options, check_trace_shape


def materialized(q, k, v, lam=None, trace=None, *, backbone="linear", log_alpha=None,
                 beta=None, capacity=30, slots="oldest-first", dtype=None):
    """DLA's outputs from a trace, by the O(T^2) form.   -> o [B, T, H, Dv]

    Arguments as in ``dla_ref.dla`` (lam: None or any shape that broadcasts to
    [B, T, H, K]). The trace (from an empty cache, of any namespace) fixes the
    partition; its scores are not used. A trace that does not fit the capacity raises
    ValueError. o has the result dtype of the inputs, as ``dla``'s.
    """
    check_options(capacity=capacity, tau=0.0, backbone=backbone, score="token",
                  normalize=True, slots=slots, eps=1.0)
    xp, (B, T, H, _, _), tokens = prepare_tokens(q, k, v, lam, log_alpha, beta, backbone,
                                                 capacity, dtype)
    trace = to_namespace(xp, device(q), trace)
    check_trace_shape(xp, trace, B, T, H)
    counts, m = partition_history(xp, *trace_to_streams(xp, trace), capacity)
    weights = readout_mask(xp, counts, m, tokens.lam, slots)
    o = masked_form(xp, tokens.q, tokens.k, tokens.v, weights, tokens.alpha, tokens.beta,
                    backbone)
    out_dtype = xp.result_type(*(x for x in (q, k, v, lam) if x is not None))
    return xp.astype(from_streams(xp, o, B, H), out_dtype)


def partition_history(xp, boundary, merged, capacity, n=None, m=None):
    """Replay a trace on the slot counts alone.   -> counts [N, T, K] int, m [N, T] int

    boundary [N, T] bool, merged [N, T] int; n [N, K], m [N] the counts of an initial
    cache (empty if None). counts[:, t, i] = n_i after token t. It uses the same merge
    and write functions as the recurrent step, on the token counts instead of the
    states, so the start token of slot i at time t is sum_{l < i} counts[:, t, l]
    (``block_starts``). A trace that does not fit the capacity raises ValueError,
    so backends call this to check a forced trace before running it.
    """
    N, T = boundary.shape
    K = capacity
    n = xp.zeros((N, K), dtype=xp.int64, device=device(boundary)) if n is None else n
    m = xp.zeros((N,), dtype=xp.int64, device=device(boundary)) if m is None else m
    opts = check_options(capacity=K, tau=0.0, backbone="linear", score="token",
                         normalize=True, slots="oldest-first", eps=1.0)
    counts, used = [], []
    for t in range(T):  # forced_decision is the one definition of "a trace fits"
        b, j = forced_decision(xp, boundary[:, t], merged[:, t], t, opts)(None, m, n, None)
        n = merge_adjacent(xp, n, j)
        m = m - xp.astype(j >= 0, m.dtype)
        n = write_token(xp, n, m, b, xp.ones_like(m))
        m = m + xp.astype(b, m.dtype)
        counts.append(n)
        used.append(m)
    return xp.stack(counts, axis=1), xp.stack(used, axis=1)


def block_starts(xp, counts, m):
    """The first token of each used slot: sum_{l < i} n_l, -1 for unused slots.

    counts [..., K] int (n_i), m [...] int (slots in use) -> [..., K] int. Positions
    count from the stream's first token, including those of an initial cache.
    """
    starts = xp.cumulative_sum(counts, axis=-1) - counts
    slot = xp.arange(counts.shape[-1], dtype=m.dtype, device=device(m))
    return xp.where(slot < m[..., None], starts, xp.full_like(starts, -1))


def slot_of(xp, starts, positions):
    """The slot holding each token position: used slots starting at or before it, minus 1.

    starts [..., K] (``block_starts``, -1 unused), positions [..., P] (broadcasting
    against starts' leading axes) -> [..., P] int.
    """
    s = xp.astype(positions, starts.dtype)[..., :, None]
    begun = (starts[..., None, :] <= s) & (starts[..., None, :] >= 0)
    return xp.sum(xp.astype(begun, starts.dtype), axis=-1) - 1


def readout_mask(xp, counts, m, lam, slots):
    """Lambda[t, s] = w_t[slot holding s at time t] for s <= t, else 0.   [N, T, T]

    counts [N, T, K], m [N, T], lam [N, T, K] (``partition_history``).
    """
    N, T, K = counts.shape
    s = xp.arange(T, dtype=xp.int64, device=device(counts))
    slot = xp.arange(K, dtype=xp.int64, device=device(counts))
    holder = slot_of(xp, block_starts(xp, counts, m), s)  # [N, T(t), T(s)]

    w = xp.stack([slot_weights(xp, lam[:, t, :], m[:, t], slots) for t in range(T)], axis=1)
    onehot = xp.astype(holder[..., None] == slot[None, None, None, :], w.dtype)
    Lam = xp.sum(onehot * w[:, :, None, :], axis=3)
    causal = s[:, None] >= s[None, :]
    return xp.where(causal[None, :, :], Lam, xp.zeros_like(Lam))


def masked_form(xp, q, k, v, weights, alpha, beta, backbone):
    """o_t = sum_s weights[t, s] (q_t^T P_{t,s} k~_s) v_s.

    q, k [N, T, Dk], v [N, T, Dv], weights [N, T, T] (zero above the diagonal),
    alpha, beta [N, T] or None. Shared by ``materialized`` and the Fenwick check of
    ``loglinear``.
    """
    return xp.matmul(weights * propagated_scores(xp, q, k, alpha, beta, backbone), v)


def propagated_scores(xp, q, k, alpha, beta, backbone):
    """A[t, s] = q_t^T P_{t,s} k~_s for every t, s.   -> [N, T(t), T(s)]

    P_{t,s} = G_t ... G_{s+1}; k~_s = beta_s k_s (gdn) or k_s. The row vectors
    q_t^T P_{t,s} are built for every t at once by a backward sweep over s:
    u_t(t) = q_t and u_t(s-1) = G_s^T u_t(s). Entries above the diagonal (s > t) are
    left 0, which ``weights`` masks anyway.
    """
    T = q.shape[1]
    t_index = xp.arange(T, device=device(q))
    u = xp.zeros_like(q)  # u[:, t] = P_{t,s}^T q_t for the current s (rows t >= s)
    scores = []
    for s in range(T - 1, -1, -1):
        u = xp.where((t_index == s)[None, :, None], q, u)
        a_s, b_s = (None if x is None else x[:, s] for x in (alpha, beta))
        ks = k[:, s, :] if backbone != "gdn" else b_s[:, None] * k[:, s, :]
        scores.append(xp.sum(u * ks[:, None, :], axis=2))  # [N, T]: q_t^T P_{t,s} k~_s
        u = transposed_transition(xp, u, k[:, s, :], a_s, b_s, backbone)
    return xp.stack(scores[::-1], axis=2)


def transposed_transition(xp, u, k_s, alpha_s, beta_s, backbone):
    """G_s^T u for rows u [N, T, Dk]: one factor of P_{t,s}^T.   -> [N, T, Dk]

    k_s [N, Dk], alpha_s [N] (mamba2, gdn), beta_s [N] (gdn) or None.

    linear: u;  mamba2: alpha_s u;  gdn: alpha_s (u - beta_s (u . k_s) k_s)
    (G_s is symmetric for every backbone). Written apart from ``step.transition`` so
    that this form shares no code with the recurrent one it checks.
    """
    if backbone == "linear":
        return u
    a = alpha_s[:, None, None]
    if backbone == "mamba2":
        return a * u
    uk = xp.sum(u * k_s[:, None, :], axis=2)
    return a * (u - beta_s[:, None, None] * uk[:, :, None] * k_s[:, None, :])


def slot_starts(trace, capacity):
    """The partition history of a trace: start token of every used slot at every t.

    trace: a Trace [B, T, H] from an empty cache. -> starts [B, T, H, K] int,
    starts[b, t, h, i] = first token of slot i after token t, -1 for unused slots.
    """
    xp = array_namespace(trace.boundary)
    B, T, H = trace.boundary.shape
    check_trace_shape(xp, trace, B, T, H)
    counts, m = partition_history(xp, *trace_to_streams(xp, trace), capacity)
    return from_streams(xp, block_starts(xp, counts, m), B, H)


def partition(result) -> Partition:
    """The final partition of every stream of a run, in the result's namespace.

    result: a ``Result`` of any backend. Returns Partition(starts [B, H, K] int64,
    the first token of each block (slot) at the end, -1 for unused slots; slot
    [B, T, H] int64, the block that holds each token of the run at the end). Token
    positions count from the stream's start: with an initial cache of P tokens, the
    run's token t is position P + t. Read from the final cache: sum_{l < i} n_l.
    """
    if not isinstance(result, Result):
        raise TypeError(f"result must be a dla_ref.Result, got {type(result).__name__}")
    xp = array_namespace(result.cache.n)
    n, m = xp.astype(result.cache.n, xp.int64), xp.astype(result.cache.m, xp.int64)
    T = result.trace.boundary.shape[1]
    starts = block_starts(xp, n, m)  # [B, H, K]
    first = xp.sum(n, axis=-1) - T  # [B, H]: position of the run's token 0
    positions = first[..., None] + xp.arange(T, dtype=xp.int64, device=device(n))
    slot = slot_of(xp, starts, positions)  # [B, H, T]
    return Partition(starts, xp.permute_dims(slot, (0, 2, 1)))
