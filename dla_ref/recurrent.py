"""The recurrent form: DLA token by token over a batch, and its baselines.

``dla`` is the public entry (docs/spec/boundaries.md and the pages it links); ``fixed``
and ``single`` are the baselines of docs/spec/baselines.md, which share the cache,
transition and readout and differ only in the partition policy. Underneath: ``prepare``
(validate and lay a batch out as streams), ``scan`` (``step`` over the tokens) and
``replay`` (a forced trace as a policy, checked by ``forced_decision``).
"""

from __future__ import annotations

from ._xp import compute_dtype, device, to_namespace
from .records import Cache, Result, Tokens, Trace
from .step import decision_is_free, dla_decision, fixed_decision, step
from .validation import (broadcast_lam, check_cache, check_inputs, check_int, check_options,
                         check_trace_shape, inputs_namespace)


def dla(q, k, v, lam=None, *, backbone="linear", log_alpha=None, beta=None, tau=0.6,
        capacity=30, score="token", normalize=True, slots="oldest-first", eps=1e-6,
        trace=None, initial_cache=None, dtype=None) -> Result:
    """Dynamic Linear Attention, recurrent form (docs/spec/boundaries.md).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; lam >= 0 of any shape that broadcasts to
    [B, T, H, K] (K = capacity; [H, K] per-head constants, [B, T, H, 1], ...), or None
    for all ones; log_alpha [B, T, H] <= 0 (mamba2, gdn); beta [B, T, H] in [0, 1]
    (gdn, whose keys should have unit norm: docs/spec/backbones.md).
    trace: a ``Trace`` to replay instead of deciding (its scores are ignored and
        recomputed); every decision must fit the cache, else ValueError.
    initial_cache: a ``Cache`` to continue from (as returned by an earlier call), so
        that dla(x[:t]) followed by dla(x[t:], initial_cache=...) equals dla(x).
        A trace or cache of another namespace (torch, NumPy, ...) is converted.
    dtype: the computing (state) dtype, float64 by default (the oracle).
    Scalars may be Python or NumPy numbers. B = 0 or H = 0 give empty results.

    Returns Result(o [B, T, H, Dv], cache, trace, backend="reference"). Dtypes, the
    rule for every backend (docs/spec/readout.md): o has the result dtype of the
    inputs (result_type of q, k, v and lam); cache.S, cache.info and trace.scores are
    in the computing dtype; n, m and merged are int64, boundary bool.
    """
    opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                         normalize=normalize, slots=slots, eps=eps)
    return run_policy(q, k, v, lam, log_alpha, beta, opts, trace, initial_cache, dtype,
                      policy=lambda xp: dla_decision(xp, opts))


def fixed(q, k, v, lam=None, *, chunk, backbone="linear", log_alpha=None, beta=None,
          capacity=30, normalize=True, score="token", slots="oldest-first", eps=1e-6,
          initial_cache=None, dtype=None) -> Result:
    """The fixed(C) baseline: a new slot every ``chunk`` tokens, same density merge.

    Token t opens a slot iff the cache is empty or the tokens summarised so far
    (sum_i n_i, which counts the tokens of an initial cache too) are a multiple of
    C (``fixed_decision``). Scores are still computed, since the merge density uses
    them. Arguments and result as in ``dla``.
    """
    chunk = check_int("chunk", chunk, 1)
    opts = check_options(capacity=capacity, tau=float("inf"), backbone=backbone,
                         score=score, normalize=normalize, slots=slots, eps=eps)
    return run_policy(q, k, v, lam, log_alpha, beta, opts, None, initial_cache, dtype,
                      policy=lambda xp: fixed_decision(xp, opts, chunk))


def single(q, k, v, *, backbone="linear", log_alpha=None, beta=None, dtype=None) -> Result:
    """The single-state backbone, S_t = G_t S_{t-1} + s_t, o_t = q_t^T S_t (K = 1, lambda = 1)."""
    return dla(q, k, v, None, backbone=backbone, log_alpha=log_alpha, beta=beta,
               capacity=1, dtype=dtype)


# --- the scan -------------------------------------------------------------------


def run_policy(q, k, v, lam, log_alpha, beta, opts, trace, initial_cache, dtype, policy):
    """Validate, lay the batch out as streams, scan, and lay the results back out."""
    xp, (B, T, H), tokens, cache = prepare(q, k, v, lam, log_alpha, beta, opts,
                                           initial_cache, dtype)
    if trace is None:
        decide_at = lambda t: policy(xp)  # noqa: E731 -- the same rule at every t
    else:
        decide_at = replay(xp, to_namespace(xp, device(q), trace), B, T, H, opts)
    cache, o, scan_trace = scan(xp, tokens, cache, opts, decide_at)
    out_dtype = xp.result_type(*(x for x in (q, k, v, lam) if x is not None))
    return Result(
        o=xp.astype(from_streams(xp, o, B, H), out_dtype),
        cache=cache_from_streams(xp, cache, B, H),
        trace=Trace(*(from_streams(xp, x, B, H) for x in scan_trace)),
    )


def prepare(q, k, v, lam, log_alpha, beta, opts, initial_cache, dtype):
    """Validate the inputs and lay them out for ``scan``.

    Returns (xp, (B, T, H), tokens, cache): tokens a ``Tokens`` record of [N, T, ...]
    arrays of the computing dtype (``prepare_tokens``), cache = (S, n, info, m) over
    N streams: empty, or ``initial_cache`` (of any namespace) checked and converted.
    """
    xp, (B, T, H, Dk, Dv), tokens = prepare_tokens(q, k, v, lam, log_alpha, beta,
                                                   opts.backbone, opts.capacity, dtype)
    ftype = tokens.q.dtype
    if initial_cache is None:
        cache = empty_cache(xp, B * H, opts.capacity, Dk, Dv, ftype, device(q))
    else:
        initial_cache = to_namespace(xp, device(q), initial_cache)
        check_cache(xp, initial_cache, B, H, opts.capacity, Dk, Dv)
        cache = cache_to_streams(xp, initial_cache, ftype)
    return xp, (B, T, H), tokens, cache


def prepare_tokens(q, k, v, lam, log_alpha, beta, backbone, columns, dtype):
    """Validate the token inputs and lay them out as streams (shared by every form).

    lam: None (all ones) or any shape that broadcasts to [B, T, H, columns]; columns
    None keeps lam's own last axis (1 if lam is None). Returns (xp, (B, T, H, Dk, Dv),
    tokens), tokens a ``Tokens`` record of [N, T, ...] arrays of the computing dtype.
    """
    xp = inputs_namespace(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
    dims = check_inputs(xp, q, k, v, lam, log_alpha, beta, backbone, lam_columns=columns)
    B, T, H = dims[:3]
    if columns is None:
        columns = 1 if lam is None or lam.ndim == 0 else lam.shape[-1]
    lam = broadcast_lam(xp, lam, (B, T, H, columns), q)
    return xp, dims, tokens_to_streams(xp, compute_dtype(xp, dtype), q, k, v, lam,
                                       log_alpha, beta)


def tokens_to_streams(xp, ftype, q, k, v, lam, log_alpha, beta):
    """The inputs as a ``Tokens`` record of [N, T, ...] arrays of dtype ``ftype``.

    alpha = exp(log_alpha); alpha and beta stay None where the backbone has none.
    """
    streams = [None if x is None else to_streams(xp, xp.astype(x, ftype))
               for x in (q, k, v, lam, log_alpha, beta)]
    if streams[4] is not None:
        streams[4] = xp.exp(streams[4])
    return Tokens(*streams)


def trace_to_streams(xp, trace):
    """A Trace's decisions as streams: (boundary [N, T] bool, merged [N, T] int64)."""
    return to_streams(xp, trace.boundary), to_streams(xp, xp.astype(trace.merged, xp.int64))


def replay(xp, trace, B, T, H, opts):
    """decide_at(t) for a forced trace: its decisions at token t, checked to fit.

    trace: a ``Trace`` of namespace ``xp`` (convert others with ``to_namespace``).
    """
    check_trace_shape(xp, trace, B, T, H)
    forced_b, forced_j = trace_to_streams(xp, trace)
    return lambda t: forced_decision(xp, forced_b[:, t], forced_j[:, t], t, opts)


def scan(xp, tokens, cache, opts, decide_at):
    """Run ``step`` over t = 0 ... T-1 for N streams.

    tokens: a ``Tokens`` record, each field [N, T, ...] or None.
    decide_at(t) -> the policy for token t (see ``step``).
    Returns (cache, o [N, T, Dv], (scores, boundary, merged) each [N, T]).
    """
    T = tokens.q.shape[1]
    outputs, scores, boundaries, merges = [], [], [], []
    for t in range(T):
        token = Tokens(*(None if x is None else x[:, t, ...] for x in tokens))
        cache, o, score, b, j = step(xp, cache, token, opts, decide_at(t))
        outputs.append(o)
        scores.append(score)
        boundaries.append(b)
        merges.append(j)
    stack = lambda xs: xp.stack(xs, axis=1)  # noqa: E731
    return cache, stack(outputs), (stack(scores), stack(boundaries), stack(merges))


def forced_decision(xp, boundary, merged, t, opts):
    """A policy that replays given decisions, after checking that they fit the cache.

    boundary [N] bool, merged [N] int for token t. Rules (docs/spec/trace.md): an
    empty cache must open a slot; where the decision is not free (``decision_is_free``:
    K = 1) no later token may; a merge (j >= 0) happens iff the token opens a slot
    while the cache is full, and then 0 <= j <= K-2.
    """
    K = opts.capacity

    def decide(score, m, n, info, *facts):  # the per-stream facts are not read
        must_merge = boundary & (m == K) & decision_is_free(m, K)
        problems = (
            (m == 0) & ~boundary,
            (m > 0) & boundary & ~decision_is_free(m, K),
            must_merge & ((merged < 0) | (merged > K - 2)),
            ~must_merge & (merged != -1),
        )
        what = ("the cache is empty, so the token must open a slot (boundary=True)",
                "capacity is 1, so only the first token may open a slot",
                f"the cache is full, so merged must lie in [0, {K - 2}]",
                "no merge happens here (no boundary or cache not full), so merged must be -1")
        for bad, why in zip(problems, what):
            if bool(xp.any(bad)):
                raise ValueError(f"trace does not fit the cache at token t={t}: {why}")
        return boundary, merged

    return decide


# --- layout: [B, T, H, ...] <-> streams [N, T, ...] ----------------------------


def to_streams(xp, x):
    """[B, T, H, ...] -> [N = B*H, T, ...] (stream n = b*H + h)."""
    B, T, H = x.shape[:3]
    perm = (0, 2, 1) + tuple(range(3, x.ndim))
    return xp.reshape(xp.permute_dims(x, perm), (B * H, T) + tuple(x.shape[3:]))


def from_streams(xp, x, B, H):
    """[N, T, ...] -> [B, T, H, ...]."""
    T = x.shape[1]
    x = xp.reshape(x, (B, H, T) + tuple(x.shape[2:]))
    return xp.permute_dims(x, (0, 2, 1) + tuple(range(3, x.ndim)))


def empty_cache(xp, N, K, Dk, Dv, dtype, device=None):
    """A cache with no slot in use, for N streams (on ``device``)."""
    zeros = lambda shape, dtype: xp.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    return (zeros((N, K, Dk, Dv), dtype), zeros((N, K), xp.int64), zeros((N, K), dtype),
            zeros((N,), xp.int64))


def cache_to_streams(xp, cache, dtype):
    """A public Cache [B, H, ...] -> the scan's (S, n, info, m) over streams [N, ...]."""
    B, H = cache.m.shape
    flat = lambda x: xp.reshape(x, (B * H,) + tuple(x.shape[2:]))  # noqa: E731
    return (flat(xp.astype(cache.S, dtype)), flat(xp.astype(cache.n, xp.int64)),
            flat(xp.astype(cache.info, dtype)), flat(xp.astype(cache.m, xp.int64)))


def cache_from_streams(xp, cache, B, H):
    """The scan's (S, n, info, m) over streams -> a public Cache [B, H, ...]."""
    return Cache(*(xp.reshape(x, (B, H) + tuple(x.shape[1:])) for x in cache))
