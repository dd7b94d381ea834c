"""The Torch backend: DLA's recurrent scan (SPEC §3) batched over all N = B*H streams.

Same signature, semantics and result as ``dla_ref.dla``; registered as "torch".
Runs unchanged on CPU and CUDA tensors, and is differentiable: under a forced trace,
gradients of o and of the final cache's S reach q, k, v, lam, log_alpha and beta.

What differs from the reference, and why:

- State dtype: float64 for float64 inputs, float32 for float32 / float16 / bfloat16
  (half-precision states lose too much over a long scan). o comes back in the input
  dtype (q, k, v, lam, log_alpha and beta promoted together).
- The slot map. The reference keeps S in chronological order, so a merge shifts every
  later state one slot left: O(K Dk Dv) per stream. Here the slot fields (S, n, info)
  are storage of N*K rows (S viewed as [N*K, Dk, Dv]) and a small table P [N, K] says
  which row holds logical (chronological) slot i of stream n: P[n, i], one of the
  rows n*K ... n*K + K-1 that belong to stream n, like the block table of a paged KV
  cache. Merging logical slots j and j+1 adds row P[j+1] into row P[j], empties it
  and moves that entry of P to the end, where the next append finds it: O(Dk Dv) per
  stream. Rows not referenced by a used logical slot are zero, as in the reference,
  so absorb and append are the same write ("add s_t"). Rows are read and written
  with index_select / index_add_ on the flat storage (cheaper than advanced indexing),
  and the result is returned in logical order.
- Writes are in place (index_add_), never on a tensor autograd saved: while autograd
  records, the transition produces a fresh S each token and the writes go there, so
  the scan stays differentiable (and keeps every token's S for backward, O(T K Dk Dv)
  memory, as any recurrent form does). Per token only the transition and the readout
  pass over all K states.
- Decisions are made on detached values: I_t and J carry no gradient (they only steer
  the discrete boundary and merge choices, on which o and S do not depend smoothly).
- No host synchronisation inside the token loop. The checks of a forced trace and of
  an initial cache run once, up front, on host copies (the reference's checks build
  their index arrays on the default device).

Versions: v1 = ``dla_ref.dla`` on torch tensors (the reference's own scan: one-hot
merges and writes over all K slots, float64); v2 (this file, shipped and tested) = the
slot map, index writes, float32 state.
"""

from __future__ import annotations

from functools import reduce

from dla_ref.parallel import partition_history
from dla_ref.records import Cache, Result, Trace
from dla_ref.recurrent import cache_to_streams, empty_cache, from_streams, to_streams
from dla_ref.step import dla_decision, information_score
from dla_ref.validation import check_cache, check_inputs, check_options, check_trace_shape


def dla(q, k, v, lam, *, backbone="linear", log_alpha=None, beta=None, tau=0.6,
        capacity=30, score="token", normalize=True, slots="oldest-first", eps=1e-6,
        trace=None, initial_cache=None) -> Result:
    """Dynamic Linear Attention, recurrent form, on torch tensors (see ``dla_ref.dla``).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; lam [B, T, H, K] >= 0; log_alpha [B, T, H] <= 0
    (mamba2, gdn); beta [B, T, H] in [0, 1] (gdn). trace: a Trace to replay (its scores
    are recomputed); initial_cache: a Cache to continue from.

    Returns Result(o [B, T, H, Dv] in the input dtype, cache (S, info in the state dtype;
    n, m int64), trace (scores in the state dtype, boundary bool, merged int64)), all on
    q's device.
    """
    import array_api_compat
    import torch

    opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                         normalize=normalize, slots=slots, eps=eps)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor for the torch backend, "
                        f"got {type(q).__name__}")
    xp = array_api_compat.array_namespace(q, k, v, lam)
    B, T, H, Dk, Dv = check_inputs(xp, q, k, v, lam, log_alpha, beta, backbone,
                                   lam_columns=capacity)
    inputs = [x for x in (q, k, v, lam, log_alpha, beta) if x is not None]
    in_dtype = reduce(torch.promote_types, (x.dtype for x in inputs))
    dtype = torch.float64 if in_dtype == torch.float64 else torch.float32

    cache = initial_state(xp, initial_cache, B, H, capacity, Dk, Dv, dtype, q.device)
    if trace is None:
        decide_at = lambda t: dla_decision(xp, opts)  # noqa: E731 -- the same rule at every t
    else:
        decide_at = forced_decisions(xp, trace, cache, B, T, H, capacity, q.device)
    tokens = stream_tokens(xp, q, k, v, lam, log_alpha, beta, dtype)
    # Without autograd recording, the linear backbone may write into last token's S.
    recording = torch.is_grad_enabled() and any(
        x.requires_grad for x in inputs + ([] if initial_cache is None else [initial_cache.S]))

    (S, n, info, m, P), o, decided = scan(xp, tokens, cache, opts, decide_at, recording)
    S, n, info = (logical(x, P) for x in (S, n, info))
    return Result(
        o=from_streams(xp, o, B, H).to(in_dtype),
        cache=Cache(*(x.reshape((B, H) + tuple(x.shape[1:])) for x in (S, n, info, m))),
        trace=Trace(*(from_streams(xp, x, B, H) for x in decided)),
    )


# --- setup: layout, initial cache, forced trace -----------------------------------


def stream_tokens(xp, q, k, v, lam, log_alpha, beta, dtype):
    """The inputs as a list of T per-token tuples over streams, in the state dtype.

    Token t is (q [N, Dk], k [N, Dk], kt [N, Dk], v [N, Dv], lam [N, K], alpha [N] | None):
    kt = beta k for gdn and k otherwise (k~ of SPEC §5, so s_t = kt v^T), alpha =
    exp(log_alpha). Everything that does not depend on the decisions is computed here
    for all t at once.
    """
    from itertools import repeat

    q, k, v, lam = (to_streams(xp, x.to(dtype)) for x in (q, k, v, lam))
    kt = k if beta is None else to_streams(xp, beta.to(dtype))[..., None] * k
    alpha = None if log_alpha is None else to_streams(xp, log_alpha.to(dtype)).exp()
    per_token = [repeat(None) if x is None else x.unbind(1) for x in (q, k, kt, v, lam, alpha)]
    return list(zip(*per_token))


def initial_state(xp, initial_cache, B, H, K, Dk, Dv, dtype, device):
    """The scan's state (S, n, info, m, P) over N streams: an empty cache or a copy of
    ``initial_cache``, checked by the reference, with the identity slot map
    P [N, K] (P[n, i] = n*K + i).

    The copies are the scan's own: it writes into them in place.
    """
    import torch

    if initial_cache is None:
        S, n, info, m = empty_cache(xp, B * H, K, Dk, Dv, dtype)
        S, n, info, m = S.to(device), n.to(device), info.to(device), m.to(device)
    else:
        check_cache(xp, on_host(initial_cache), B, H, K, Dk, Dv)
        # cache_to_streams copies (astype), so the scan may write into its result
        S, n, info, m = (x.to(device).contiguous()
                         for x in cache_to_streams(xp, initial_cache, dtype))
    P = torch.arange(B * H * K, device=device).reshape(B * H, K)
    return S, n, info, m, P


def forced_decisions(xp, trace, cache, B, T, H, K, device):
    """decide_at(t) for a forced trace, after checking once that the trace fits.

    dla_ref.partition_history replays the trace on the slot counts of the initial
    cache and raises the reference's ValueError at the first decision that does not
    fit. The replay runs on the host, so the token loop itself never synchronises.
    """
    import torch

    check_trace_shape(xp, on_host(trace), B, T, H)
    boundary = to_streams(xp, trace.boundary).to(device)
    merged = to_streams(xp, trace.merged).to(device=device, dtype=torch.int64)
    _, n, _, m, _ = cache
    partition_history(xp, boundary.cpu(), merged.cpu(), K, n=n.cpu(), m=m.cpu())
    boundary, merged = boundary.unbind(1), merged.unbind(1)
    return lambda t: lambda score, m, n, info: (boundary[t], merged[t])


def on_host(record):
    """A Cache or Trace with its tensors copied to the CPU (anything else as it is)."""
    if not isinstance(record, (Cache, Trace)):
        return record  # the reference's check reports the wrong type
    return type(record)(*(x.cpu() if hasattr(x, "cpu") else x for x in record))


# --- the scan -------------------------------------------------------------------------


def scan(xp, tokens, cache, opts, decide_at, recording):
    """Run ``step`` over the T tokens for N streams.

    tokens: the list from ``stream_tokens``; cache: (S, n, info, m, P).
    Returns (cache, o [N, T, Dv], (scores, boundary, merged) each [N, T]).
    """
    import torch

    outputs, scores, boundaries, merges = [], [], [], []
    for t, token in enumerate(tokens):
        cache, o, score, b, j = step(xp, cache, token, opts, decide_at(t), recording)
        outputs.append(o)
        scores.append(score)
        boundaries.append(b)
        merges.append(j)
    stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
    return cache, stack(outputs), (stack(scores), stack(boundaries), stack(merges))


def step(xp, cache, token, opts, decide, recording):
    """One token for N streams (SPEC §3): transition, score, decide, merge, write, read.

    cache (S [N,K,Dk,Dv], n [N,K] int64, info [N,K], m [N] int64, P [N,K] int64): slot
    fields as storage rows addressed through P; token (q, k, kt, v, lam, alpha) as from
    ``stream_tokens``;
    decide(score, m, n, info) -> (boundary [N] bool, merged [N] int64) takes logical
    n, info, like the policies of ``dla_ref.step``; xp is the array-API namespace of
    torch that those policies and ``information_score`` take.
    Returns (cache', o [N, Dv], score [N], boundary [N], merged [N]).
    """
    import torch

    S, n, info, m, P = cache
    q, k, kt, v, lam, alpha = token

    S = transition(S, k, kt, alpha, opts.backbone, recording)
    s = kt[:, :, None] * v[:, None, :]  # s_t = k~_t v_t^T
    open_ = read(S.detach(), at(P, (m - 1).clamp(min=0)))
    score = information_score(xp, s.detach(), open_, opts)
    score = torch.where(m > 0, score, torch.zeros_like(score))  # I_0 := 0 (SPEC §3.3)

    boundary, merged = decide(score, m, logical(n, P), logical(info, P))

    if opts.capacity > 1:  # with K = 1 no pair exists and merged is always -1
        j, merging = merged.clamp(min=0), merged >= 0
        first, second = at(P, j), at(P, j + 1)
        for x in (S, n, info):
            merge_into(x, first, second, merging)
        P = close_gap(P, merged)
        m = m - merging.long()

    target = at(P, m - 1 + boundary.long())  # absorb: the open slot; append: a zero row
    for x, value in ((S, s), (n, torch.ones_like(m)), (info, score)):
        add(x, target, value)
    m = m + boundary.long()

    o = readout(q, S, physical(slot_weights(lam, m, opts.slots), P))
    return (S, n, info, m, P), o, score, boundary, merged


# --- the pieces -------------------------------------------------------------------------


def transition(S, k, kt, alpha, backbone, recording):
    """G_t S_i for every storage row (empty rows are zero and stay zero), as a tensor
    the step may write into.

        linear: G_t = 1,   mamba2: G_t = alpha_t,   gdn: G_t = alpha_t (I - beta_t k_t k_t^T)

    S [N, K, Dk, Dv]; k, kt = beta k [N, Dk]; alpha [N] (None for linear). gdn is
    alpha S - (alpha kt) (k^T S_i), with no [N, K, Dk, Dv] temporary besides S.
    While autograd records, the result is a new tensor (the previous readout saved S
    for backward); otherwise S is updated in place, since a fresh K-state tensor per
    token costs more in page faults than the transition itself.
    """
    if backbone == "linear":
        return S.clone() if recording else S
    kS = k[:, None, None, :] @ S if backbone == "gdn" else None  # k^T S_i: [N, K, 1, Dv]
    a = alpha[:, None, None, None]
    out = a * S if recording else S.mul_(a)
    if kS is not None:
        out.addcmul_((alpha[:, None] * kt)[:, None, :, None], kS, value=-1)
    return out


def merge_into(x, first, second, merging):
    """Move row ``second`` into row ``first`` where ``merging``: first += second,
    second -= second (exactly zero, an empty slot).

    x [N, K, ...] a slot field (S, n or info), written in place; first, second [N]
    storage rows; merging [N] bool. Streams that do not merge move zero, so two index
    writes serve all streams.
    """
    import torch

    keep = merging.reshape((-1,) + (1,) * (x.ndim - 2))
    moved = torch.where(keep, read(x, second), 0)
    add(x, first, moved)
    add(x, second, -moved)


def close_gap(P, merged):
    """The slot map after logical slots j and j+1 merged (j = merged; -1: unchanged).

    Entry j+1 leaves, the later entries move up by one and the freed row (now empty)
    becomes the last entry, where the next append takes it. Each row of P stays a
    permutation of its stream's rows.   P [N, K], merged [N] -> [N, K].
    """
    import torch

    K = P.shape[1]
    slot = torch.arange(K, device=P.device)[None, :]
    j = merged[:, None]
    source = torch.where((j >= 0) & (slot > j), slot + 1, slot)
    return P.gather(1, torch.where(source == K, j + 1, source))


def slot_weights(lam, m, slots):
    """w_i = lambda[l(i)] for the used logical slots i < m, else 0.   [N, K]

    slots="oldest-first": l(i) = i;  "newest-first": l(i) = m - 1 - i. Same rule as
    dla_ref.step.slot_weights, written as a gather (the reference uses a one-hot sum
    over K columns, and builds its index on the default device).
    """
    import torch

    slot = torch.arange(lam.shape[1], device=lam.device)[None, :]
    if slots == "newest-first":
        lam = lam.gather(1, (m[:, None] - 1 - slot).clamp(min=0))
    return torch.where(slot < m[:, None], lam, 0)


def at(P, i):
    """The storage row of logical slot i[n] of every stream: P[n, i[n]].   [N]"""
    return P.gather(1, i[:, None])[:, 0]


def read(x, rows):
    """Rows of a slot field: x viewed as [N*K, ...], rows [N*R] -> [N*R, ...]."""
    return x.flatten(0, 1).index_select(0, rows)


def add(x, rows, value):
    """x[rows] += value in place, x viewed as [N*K, ...]; rows distinct.

    ``view``, not ``flatten``: a copy would drop the write, so fail instead.
    """
    x.view((-1,) + tuple(x.shape[2:])).index_add_(0, rows, value)


def logical(x, P):
    """A slot field in logical order: out[n, i] = x at row P[n, i].   [N, K, ...]"""
    return read(x, P.flatten()).reshape(x.shape)


def physical(w, P):
    """A per-slot row from logical order to storage rows: out at row P[n, i] = w[n, i]."""
    return w.new_zeros(w.numel()).scatter(0, P.flatten(), w.flatten()).reshape(w.shape)


def readout(q, S, w):
    """o_t = sum_i w_i q_t^T S_i, one batched matrix-vector product over all slots.

    q [N, Dk], S [N, K, Dk, Dv], w [N, K] (storage order, see ``physical``) -> [N, Dv].
    """
    N, K, Dk, Dv = S.shape
    wq = (w[:, :, None] * q[:, None, :]).reshape(N, 1, K * Dk)
    return (wq @ S.reshape(N, K * Dk, Dv))[:, 0]
