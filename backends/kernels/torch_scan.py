"""The Torch backend ("torch"): DLA's recurrent scan batched over all N = B*H streams.

Runs unchanged on CPU and CUDA tensors and is differentiable: under a forced trace,
gradients of o and of the final S reach q, k, v, lam, log_alpha, beta and an initial
cache's S. Decisions are made on detached values (I_t and J carry no gradient). The
state is float64 for float64 inputs and float32 otherwise; o comes back in the inputs'
dtype. The slot fields live in N*K storage rows addressed through a slot map P [N, K]
(like a paged KV cache's block table), so a merge moves one state, not K. No host
synchronisation inside the token loop: the host side (``dla_backends.host``) checks a
forced trace and an initial cache once, up front.

Versions: v1 = ``dla_ref.dla`` on torch tensors (the reference's scan: one-hot merges
and writes over all K slots, float64; run it as the "reference" backend); v2 (shipped,
tested) = the slot map, index writes, a float32 state for float32 and half inputs.

Design notes (the slot map, in-place writes under autograd): docs/kernels.md.
"""

from __future__ import annotations

from dla_backends import host
from dla_ref.step import dla_decision, information_score


def dla(q, k, v, lam=None, **options):
    """``dla_ref.dla`` on torch tensors (CPU or CUDA): the same keywords, checks, errors
    and result. o in the inputs' dtype; S, info and scores in the state dtype."""
    return host.run(launch, q, k, v, lam, backend="torch", **options)


def launch(call: host.Call) -> host.Launched:
    """The scan on the call's own cache (written in place), with the identity slot map
    P[n, i] = n*K + i; the cache comes back in logical (slot) order."""
    import torch

    (N, _), K = call.streams, call.opts.capacity
    P = torch.arange(N * K, device=call.device).reshape(N, K)
    if call.forced is None:
        decide_at = lambda t: dla_decision(call.xp, call.opts)  # noqa: E731 -- same at every t
    else:
        decide_at = replay(call.forced, call.device)
    cache = (*call.cache, P)
    (S, n, info, m, P), o, decided = scan(call.xp, per_token(call.tokens), cache, call.opts,
                                          decide_at, call.recording)
    S, n, info = (logical(x, P) for x in (S, n, info))
    return host.Launched(o, (S, n, info, m), decided)


def per_token(tokens):
    """The streams as a list of T per-token tuples (q, k, kt, v, lam, alpha) over N streams:
    kt = beta k for gdn and k otherwise (k~, so s_t = kt v^T); alpha None for linear."""
    from itertools import repeat

    kt = tokens.k if tokens.beta is None else tokens.beta[..., None] * tokens.k
    fields = (tokens.q, tokens.k, kt, tokens.v, tokens.lam, tokens.alpha)
    return list(zip(*(repeat(None) if x is None else x.unbind(1) for x in fields)))


def replay(forced: host.Forced, device):
    """decide_at(t) for a forced trace (already checked to fit by the host)."""
    import torch

    boundary, merged = (torch.from_numpy(x).to(device).unbind(1) for x in forced)
    return lambda t: lambda score, m, n, info, silent: (boundary[t], merged[t])


# --- the scan -------------------------------------------------------------------------


def scan(xp, tokens, cache, opts, decide_at, recording):
    """Run ``step`` over the T tokens for N streams.

    tokens: the list from ``per_token``; cache: (S, n, info, m, P).
    Returns (cache, o [N, T, Dv], (scores, boundary, merged) each [N, T]).
    """
    import torch

    per_step = []  # (o, score, boundary, merged) of each token
    for t, token in enumerate(tokens):
        cache, *made = step(xp, cache, token, opts, decide_at(t), recording)
        per_step.append(made)
    o, scores, boundary, merged = (torch.stack(xs, dim=1) for xs in zip(*per_step))
    return cache, o, (scores, boundary, merged)


def step(xp, cache, token, opts, decide, recording):
    """One token for N streams: transition, score, decide, merge, write, read (the step
    of docs/index.md).

    cache (S [N,K,Dk,Dv], n [N,K] int64, info [N,K], m [N] int64, P [N,K] int64): slot
    fields as storage rows addressed through P; token (q, k, kt, v, lam, alpha) as from
    ``per_token``;
    decide(score, m, n, info, silent) -> (boundary [N] bool, merged [N] int64) takes logical
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
    # a zero contribution (beta = 0, k = 0 or v = 0; kt = beta k is 0 iff beta = 0 for a
    # nonzero k, short of underflow) scores I_t := 0 and is absorbed, like I_0 := 0
    silent = ~(k != 0).any(-1) | ~(kt != 0).any(-1) | ~(v != 0).any(-1)
    score = torch.where((m > 0) & ~silent, score, torch.zeros_like(score))

    boundary, merged = decide(score, m, logical(n, P), logical(info, P), silent)

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
