"""One step of DLA, one function per idea (docs/spec/, the pages linked from docs/index.md).

Every function acts on N independent streams at once and is written against the
array API (``xp`` is the namespace of the inputs). Shapes use the names of
``records``: N streams, K slots, Dk, Dv. Per-stream decisions are made with
``where`` over fixed-shape arrays, never by indexing with data, so the code runs
under ``array_api_strict`` and on torch tensors as well as NumPy.

The step, for token t of every stream:

    1. S_i <- G_t S_i                                   transition
    2. I_t  = ||R(a) - R(S_open)|| / (||R(S_open)|| + eps)   information_score
    3. b_t  = [m = 0] or [I_t >= tau]                   is_boundary
    4. b_t = 0: S_open += s_t                           absorb
    5. b_t = 1: merge the least dense pair if full,     merge_choice, merge_adjacent
                then open a slot with s_t               append
    6. o_t  = sum_{i<m} lambda_t[l(i)] q_t^T S_i        readout

Steps 3 and 5 are the policy (``dla_decision``; ``fixed_decision`` for the fixed(C)
baseline; a replayed trace); the rest is the same for every policy.
"""

from __future__ import annotations

from ._xp import device
from .records import Options


# --- 1. transition ----------------------------------------------------------


def transition(xp, S, k, alpha, beta, backbone):
    """Apply the backbone transition G_t to every slot: S_i <- G_t S_i.

        linear: G_t = 1
        mamba2: G_t = alpha_t
        gdn:    G_t = alpha_t (I - beta_t k_t k_t^T)

    S [N, K, Dk, Dv], k [N, Dk], alpha [N] (ignored for linear), beta [N] (gdn only).
    Unused slots are zero and stay zero, since G_t is linear.
    """
    if backbone == "linear":
        return S
    a = alpha[:, None, None, None]
    if backbone == "mamba2":
        return a * S
    kS = xp.matmul(k[:, None, None, :], S)  # k^T S_i: [N, K, 1, Dv]
    return a * (S - beta[:, None, None, None] * (k[:, None, :, None] * kS))


def contribution(xp, k, v, beta, backbone):
    """The token's contribution to memory: s_t = k_t v_t^T (times beta_t for gdn).

    k [N, Dk], v [N, Dv], beta [N] -> s [N, Dk, Dv].
    """
    s = k[:, :, None] * v[:, None, :]
    if backbone == "gdn":
        s = beta[:, None, None] * s
    return s


# --- 2. information score ---------------------------------------------------


def slot_mask(xp, m, K, offset=0):
    """One-hot of slot m + offset per stream: [N, K] bool (all False if out of range)."""
    slot = xp.arange(K, dtype=m.dtype, device=device(m))
    return slot[None, :] == (m + offset)[:, None]


def open_state(xp, S, m):
    """The open (newest) state S_{m-1}, or zeros when m = 0.  S [N, K, Dk, Dv] -> [N, Dk, Dv]."""
    pick = xp.astype(slot_mask(xp, m, S.shape[1], offset=-1), S.dtype)
    return xp.sum(pick[:, :, None, None] * S, axis=1)


def frobenius(xp, X):
    """||X||_F over the last two axes: [N, Dk, Dv] -> [N]."""
    return xp.sqrt(xp.sum(X * X, axis=(-2, -1)))


def rms_normalize(xp, X, eps):
    """R(X) = X / sqrt(mean(X^2) + eps), the mean over all Dk*Dv entries, no gain."""
    ms = xp.mean(X * X, axis=(-2, -1))
    return X / xp.sqrt(ms + eps)[:, None, None]


def information_score(xp, s, S_open, opts: Options):
    """I_t = ||R(A) - R(S_open)||_F / (||R(S_open)||_F + eps)     [N]

    A = s_t (score="token", the default) or S_open + s_t (score="state");
    R = rms_normalize if opts.normalize, else the identity.
    S_open is the open state after the transition. The value is meaningless for a
    stream with no open slot (m = 0); ``step`` replaces it by 0 there.
    """
    A = s if opts.score == "token" else S_open + s
    if opts.normalize:
        A, S_open = rms_normalize(xp, A, opts.eps), rms_normalize(xp, S_open, opts.eps)
    return frobenius(xp, A - S_open) / (frobenius(xp, S_open) + opts.eps)


def information_score_from_scalars(xp, ss, SS, sS, size, opts: Options):
    """I_t from three scalars per stream (SPEC §7); equals ``information_score``.   [N]

    ss = ||s_t||_F^2, SS = ||S_open||_F^2, sS = <S_open, s_t>_F, each [N];
    size = Dk * Dv, the number of entries R averages over. For s_t = beta_t k_t v_t^T
    the scalars are beta^2 ||k||^2 ||v||^2, ||S_open||^2 and beta k^T S_open v, so a
    chunked scan can decide boundaries without forming a Dk x Dv difference per token.
    With B = S_open and A = s_t (score="token") or S_open + s_t (score="state"):

        ||A||^2 = ss or SS + 2 sS + ss,      <A, B> = sS or SS + sS
        r_X     = 1 / sqrt(||X||^2 / size + eps)      (r_X = 1 if not normalize)
        I_t     = sqrt(r_A^2 ||A||^2 - 2 r_A r_B <A, B> + r_B^2 ||B||^2) / (r_B ||B|| + eps)

    The expansion cancels where R(A) is close to R(B): there I_t carries an absolute
    error of about sqrt(machine epsilon) (1e-8 in float64, 3e-4 in float32) and the
    radicand can round below 0, which is read as 0. Near tau = 0.6 the error is of
    the order of machine epsilon, as in the direct form.
    """
    if opts.score == "token":
        AA, AB = ss, sS
    else:
        AA, AB = SS + 2 * sS + ss, SS + sS
    if opts.normalize:
        rA, rB = 1 / xp.sqrt(AA / size + opts.eps), 1 / xp.sqrt(SS / size + opts.eps)
    else:
        rA, rB = xp.ones_like(SS), xp.ones_like(SS)
    radicand = rA * rA * AA - 2 * rA * rB * AB + rB * rB * SS
    distance = xp.sqrt(xp.maximum(radicand, xp.zeros_like(radicand)))
    return distance / (rB * xp.sqrt(SS) + opts.eps)


# --- 3. boundary --------------------------------------------------------------


def decision_is_free(m, capacity):
    """Where a policy chooses b_t: the cache is non-empty and K >= 2.   [N] bool

    Elsewhere the rules decide (``admit_boundary``): a stream's first token opens a
    slot, and with capacity K = 1 no pair can ever be merged, so no later token opens
    one: DLA with K = 1 is the single-state backbone (docs/spec/boundaries.md). This
    is the one place the K = 1 rule is written.
    """
    return (m > 0) & (capacity > 1)


def admit_boundary(xp, wish, m, capacity):
    """b_t: a policy's ``wish`` [N] bool where ``decision_is_free``, else b_t = [m = 0]."""
    return xp.where(decision_is_free(m, capacity), wish, m == 0)


def is_boundary(xp, score, m, opts: Options):
    """b_t = [m = 0] or [I_t >= tau]   (note >=; tau = +inf never, -inf always)   [N] bool.

    With K = 1 only the first token opens a slot (``decision_is_free``).
    """
    return admit_boundary(xp, score >= opts.tau, m, opts.capacity)


# --- 5a. capacity-bounded merging ---------------------------------------------


def pair_density(xp, n, info):
    """Density of each adjacent pair: (J_j + J_{j+1}) / (n_j + n_{j+1}),  [N, K-1].

    Pairs that involve an unused slot (n = 0) get +inf, so they are never chosen.
    """
    count = n[:, :-1] + n[:, 1:]
    safe = xp.where(count > 0, count, xp.ones_like(count))
    density = (info[:, :-1] + info[:, 1:]) / xp.astype(safe, info.dtype)
    return xp.where(count > 0, density, xp.full_like(density, float("inf")))


def merge_choice(xp, n, info, m, boundary, capacity):
    """The pair to merge before a new slot is opened, or -1.   [N] int

    A merge happens iff b_t = 1 and the cache is full (m = K). Then
    j = argmin_{j in 0..K-2} (J_j + J_{j+1}) / (n_j + n_{j+1}); ties go to the
    smallest j (the oldest pair), which is what the array API's argmin returns.
    The open state takes part (pair K-2, K-1); the new token does not. With K = 1
    there is no pair, and no boundary meets a full cache (``decision_is_free``).
    """
    none = xp.full_like(m, -1)
    density = pair_density(xp, n, info)
    if density.shape[1] == 0:  # K = 1: argmin over no pairs is undefined
        return none
    j = xp.astype(xp.argmin(density, axis=-1), m.dtype)
    return xp.where(boundary & (m == capacity), j, none)


def merge_adjacent(xp, x, j, fill=0):
    """Merge slot j+1 into slot j and shift the later slots left by one.

    x [N, K, ...] (S, n, info, or any per-slot field), j [N] (-1: leave x as is).
    Slot j becomes x_j + x_{j+1}; slot i > j becomes x_{i+1}; slot K-1 becomes
    ``fill`` (the value of an unused slot).
    """
    tail = xp.full_like(x[:, :1, ...], fill)
    shifted = xp.concat([x[:, 1:, ...], tail], axis=1)  # slot i holds x_{i+1}
    extra = (1,) * (x.ndim - 2)
    slot = xp.reshape(xp.arange(x.shape[1], dtype=j.dtype, device=device(j)), (1, -1) + extra)
    jj = xp.reshape(j, (-1, 1) + extra)
    merged = xp.where(slot < jj, x, xp.where(slot == jj, x + shifted, shifted))
    return xp.where(jj >= 0, merged, x)


# --- 4 / 5b. absorb or append -------------------------------------------------


def write_token(xp, x, m, boundary, value):
    """Write one token's value into the slot fields: absorb or append.

    b_t = 0: slot m-1 (the open slot) += value          (absorb)
    b_t = 1: slot m (a fresh, zero slot) = value         (append)
    x [N, K, ...], m [N] slots in use *after* any merge, boundary [N], value [N, ...].
    Both cases are "add value to slot m - 1 + b", because a fresh slot holds zero.
    """
    target = m - 1 + xp.astype(boundary, m.dtype)
    hit = slot_mask(xp, target, x.shape[1])
    hit = xp.reshape(hit, hit.shape + (1,) * (x.ndim - 2))
    return xp.where(hit, x + xp.expand_dims(value, axis=1), x)


# --- 6. readout -----------------------------------------------------------------


def slot_weights(xp, lam, m, slots):
    """Weight of each slot for the readout: w_i = lambda[l(i)] if i < m else 0.   [N, K]

    slots="oldest-first": l(i) = i;  "newest-first": l(i) = m - 1 - i.
    lam [N, K] >= 0.
    """
    K = lam.shape[1]
    slot = xp.arange(K, dtype=m.dtype, device=device(m))
    used = slot[None, :] < m[:, None]
    if slots == "newest-first":
        # w_i = sum_c lambda_c [c = m-1-i], a gather written as a one-hot sum.
        col = m[:, None] - 1 - slot[None, :]  # [N, K]: the lambda column of slot i
        onehot = xp.astype(col[:, :, None] == slot[None, None, :], lam.dtype)
        lam = xp.sum(onehot * lam[:, None, :], axis=-1)
    return xp.where(used, lam, xp.zeros_like(lam))


def readout(xp, q, S, w):
    """o_t = sum_i w_i q_t^T S_i.   q [N, Dk], S [N, K, Dk, Dv], w [N, K] -> [N, Dv]."""
    qS = xp.matmul(q[:, None, None, :], S)[:, :, 0, :]  # [N, K, Dv]
    return xp.sum(w[:, :, None] * qS, axis=1)


# --- the whole step -----------------------------------------------------------


def step(xp, cache, token, opts: Options, decide):
    """One token for N streams: transition, score, decide, merge, write, read out.

    cache  (S [N,K,Dk,Dv], n [N,K] int, info [N,K], m [N] int)   -- streams, not [B,H]
    token  a ``Tokens`` record of one token: q [N,Dk], k [N,Dk], v [N,Dv], lam [N,K],
           alpha [N] | None, beta [N] | None
    decide (score, m, n, info) -> (boundary [N] bool, merged [N] int): the partition
           policy (``dla_decision``, ``fixed_decision``, a replayed trace). Its
           arguments are the per-stream facts a policy may read, each [N] or [N, K];
           a new fact is one more trailing argument.
    Returns (cache', o [N, Dv], score [N], boundary [N], merged [N]).
    """
    S, n, info, m = cache
    q, k, v, lam, alpha, beta = token

    S = transition(xp, S, k, alpha, beta, opts.backbone)
    s = contribution(xp, k, v, beta, opts.backbone)
    score = information_score(xp, s, open_state(xp, S, m), opts)
    score = xp.where(m > 0, score, xp.zeros_like(score))  # I_0 := 0 (docs/spec/boundaries.md)

    boundary, merged = decide(score, m, n, info)

    S = merge_adjacent(xp, S, merged)
    n = merge_adjacent(xp, n, merged)
    info = merge_adjacent(xp, info, merged)
    m = m - xp.astype(merged >= 0, m.dtype)

    S = write_token(xp, S, m, boundary, s)
    n = write_token(xp, n, m, boundary, xp.ones_like(m))
    info = write_token(xp, info, m, boundary, score)
    m = m + xp.astype(boundary, m.dtype)

    o = readout(xp, q, S, slot_weights(xp, lam, m, opts.slots))
    return (S, n, info, m), o, score, boundary, merged


# --- policies: decide(score, m, n, info) -> (boundary, merged) -----------------


def dla_decision(xp, opts: Options):
    """DLA's own partition policy: the boundary rule, then the density merge."""

    def decide(score, m, n, info):
        boundary = is_boundary(xp, score, m, opts)
        return boundary, merge_choice(xp, n, info, m, boundary, opts.capacity)

    return decide


def fixed_decision(xp, opts: Options, chunk: int):
    """The fixed(C) policy: a slot opens when the tokens summarised so far are a multiple of C.

    sum_i n_i counts the tokens of an initial cache too; the merge is DLA's density
    merge, so the scores still matter (docs/spec/baselines.md).
    """

    def decide(score, m, n, info):
        due = xp.sum(n, axis=1) % chunk == 0
        boundary = admit_boundary(xp, due, m, opts.capacity)
        return boundary, merge_choice(xp, n, info, m, boundary, opts.capacity)

    return decide
