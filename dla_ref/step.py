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
    """I_t = min(||R(A) - R(S_open)||_F / (||R(S_open)||_F + eps), 2)     [N]

    A = s_t (score="token", the default) or S_open + s_t (score="state");
    R = rms_normalize if opts.normalize, else the identity (and then no clamp).
    S_open is the open state after the transition. The clamp changes nothing where
    mean(S_open^2) >> eps (the score is at most 2 there: opposite directions); above 2
    the score is only against a vanished open state, where it reaches sqrt(Dk Dv) / eps
    and is set by rounding noise (docs/spec/information-score.md). The value is
    meaningless where m = 0 or the contribution is zero; ``step`` sets I_t := 0 there.
    """
    A = s if opts.score == "token" else S_open + s
    if opts.normalize:
        A, S_open = rms_normalize(xp, A, opts.eps), rms_normalize(xp, S_open, opts.eps)
    return clamp_score(xp, frobenius(xp, A - S_open) / (frobenius(xp, S_open) + opts.eps), opts)


MAX_SCORE = 2.0  # the largest normalized score: R(A) = -R(B)


def clamp_score(xp, score, opts: Options):
    """min(I_t, 2) if opts.normalize, else I_t (a raw ratio has no upper bound).   [N]"""
    if not opts.normalize:
        return score
    return xp.minimum(score, xp.full_like(score, MAX_SCORE))


def zero_contribution(xp, k, v, beta, backbone):
    """Whether the token's contribution s_t is exactly zero: beta_t = 0 (gdn), k_t = 0
    or v_t = 0.   k [N, Dk], v [N, Dv], beta [N] -> [N] bool

    Tested on the inputs, not on s_t, whose entries can underflow to 0 while the
    inputs are not 0. Such a token is absorbed with I_t := 0 when m > 0 (``step``,
    ``absorb_zero_contributions``; docs/spec/information-score.md).
    """
    zero = ~xp.any(k != 0, axis=-1) | ~xp.any(v != 0, axis=-1)
    return zero | (beta == 0) if backbone == "gdn" else zero


def information_score_from_scalars(xp, ss, SS, sS, size, opts: Options):
    """I_t from three scalars per stream; equals ``information_score``.   [N]

    ss = ||s_t||_F^2, SS = ||S_open||_F^2, sS = <S_open, s_t>_F, each [N];
    size = Dk * Dv, the number of entries R averages over. For s_t = beta_t k_t v_t^T
    the scalars are beta^2 ||k||^2 ||v||^2, ||S_open||^2 and beta k^T S_open v, so a
    chunked scan can decide boundaries without forming a Dk x Dv difference per token.
    With B = S_open, A = s_t or B + s_t, r_X = 1 / sqrt(||X||^2 / size + eps) (1 if
    not normalize), the three terms of ``score_terms`` add up to ||r_A A - r_B B||^2:

        I_t = min(sqrt(t_1 + t_2 + t_3) / (r_B ||B|| + eps), 2)    (no clamp if not normalize)

    In state mode the terms are small where the score is (no two nearly equal numbers
    are subtracted); in token mode they are O(Dk Dv) and cancel where R(s_t) ~ R(B),
    which no rearrangement of the three scalars avoids: there the rounding of <B, s_t>
    itself is the error. ``score_error_bound`` states the error; the proof that this
    equals the definition is proofs/score_identities.md.
    """
    t1, t2, t3, den = score_terms(xp, ss, SS, sS, size, opts)
    radicand = t1 + t2 + t3
    distance = xp.sqrt(xp.maximum(radicand, xp.zeros_like(radicand)))  # rounding below 0
    return clamp_score(xp, distance / den, opts)


def score_terms(xp, ss, SS, sS, size, opts: Options):
    """(t_1, t_2, t_3, den): ||r_A A - r_B B||^2 = t_1 + t_2 + t_3, den = r_B ||B|| + eps.

    token (A = s):   r_A^2 ss,      -2 r_A r_B sS,     r_B^2 SS
    state (A = B + s, so r_A A - r_B B = d B + r_A s with d = r_A - r_B):
                     d^2 SS,        2 d r_A sS,        r_A^2 ss
        where P = ||A||^2 - ||B||^2 = 2 sS + ss and, free of cancellation,
        d = r_A - r_B = -(P / size) r_A^2 r_B^2 / (r_A + r_B)   (d = 0 if not normalize).
    Rounded scalars can put ||A||^2 = SS + P below 0 where A ~ 0 (a token that cancels
    the state); P is raised to -SS there, which keeps ||A||^2 >= 0 and d = r_A - r_B.
    """
    P = xp.maximum(2 * sS + ss, -SS)
    AA = ss if opts.score == "token" else SS + P
    if opts.normalize:
        rA, rB = 1 / xp.sqrt(AA / size + opts.eps), 1 / xp.sqrt(SS / size + opts.eps)
    else:
        rA, rB = xp.ones_like(SS), xp.ones_like(SS)
    den = rB * xp.sqrt(SS) + opts.eps
    if opts.score == "token":
        return rA * rA * ss, -2 * rA * rB * sS, rB * rB * SS, den
    d = -(P / size) * (rA * rA) * (rB * rB) / (rA + rB)
    if not opts.normalize:
        d = xp.zeros_like(SS)
    return d * d * SS, 2 * d * rA * sS, rA * rA * ss, den


def score_error_bound(xp, ss, SS, sS, size, opts: Options, dtype):
    """How far ``information_score_from_scalars`` computed in ``dtype`` may be from I_t.

    ss, SS, sS [N] as there (any accuracy; the bound is evaluated from them), size =
    Dk * Dv, dtype the floating dtype the kernel forms the scalars and the formula in.
    Returns (absolute [N], relative): |I_computed - I_t| <= absolute + relative * I_t,
    where, with u = finfo(dtype).eps / 2, c = 4 + sqrt(size) and
    E = (|t_1| + |t_2| + |t_3|) / den^2 (``score_terms``),

        absolute = min(sqrt(c u E), c u E / I),     relative = 4 u,

    I being the score of these scalars. c u E bounds the error of the radicand over
    den^2, which comes from the rounding of the scalars (sums of size products: about
    sqrt(size) u of their scale) and of the terms; |a - b| <= |a^2 - b^2| / (a + b)
    gives the rest. Not covered: a state that itself differs from the reference's
    (the caller adds that), and scalars that underflow in dtype. In state mode E is about
    (||s_t|| / ||S_open + s_t||)^2: a block of n similar tokens scores ~1/n, and its
    error shrinks with it. In token mode E is about 2, so the absolute error near I_t = 0
    is sqrt(2 c u) (3e-3 for float32 at Dk = Dv = 64) and near tau = 0.6 about 3 c u.
    The constants are checked, not only derived: proofs/test_score_identities.py.
    """
    t1, t2, t3, den = score_terms(xp, ss, SS, sS, size, opts)
    u = xp.finfo(dtype).eps / 2
    cuE = (4 + size**0.5) * u * (xp.abs(t1) + xp.abs(t2) + xp.abs(t3)) / (den * den)
    score = information_score_from_scalars(xp, ss, SS, sS, size, opts)
    positive = xp.where(score > 0, score, xp.ones_like(score))
    sharp = xp.where(score > 0, cuE / positive, xp.full_like(score, float("inf")))
    return xp.minimum(xp.sqrt(cuE), sharp), 4 * u


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


def absorb_zero_contributions(xp, boundary, m, silent):
    """b_t := 0 where the contribution is exactly zero (``silent`` [N] bool) and m > 0,
    whatever tau (also tau = -inf): such a token would open an empty slot, against
    which the next token scores about sqrt(Dk Dv) / eps (docs/spec/information-score.md).
    """
    return boundary & ~((m > 0) & silent)


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
    decide (score, m, n, info, silent) -> (boundary [N] bool, merged [N] int): the partition
           policy (``dla_decision``, ``fixed_decision``, a replayed trace). Its
           arguments are the per-stream facts a policy may read, each [N] or [N, K];
           a new fact is one more trailing argument.
    Returns (cache', o [N, Dv], score [N], boundary [N], merged [N]).
    """
    S, n, info, m = cache
    q, k, v, lam, alpha, beta = token

    S = transition(xp, S, k, alpha, beta, opts.backbone)
    s = contribution(xp, k, v, beta, opts.backbone)
    silent = zero_contribution(xp, k, v, beta, opts.backbone)
    score = information_score(xp, s, open_state(xp, S, m), opts)
    # I_0 := 0 (docs/spec/boundaries.md); I_t := 0 for a zero contribution, which DLA
    # absorbs (docs/spec/information-score.md)
    score = xp.where((m > 0) & ~silent, score, xp.zeros_like(score))

    boundary, merged = decide(score, m, n, info, silent)

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


# --- policies: decide(score, m, n, info, silent) -> (boundary, merged) ---------
#
# silent [N] bool: the token's contribution is exactly zero (``zero_contribution``).


def dla_decision(xp, opts: Options):
    """DLA's own partition policy: the boundary rule, then the density merge."""

    def decide(score, m, n, info, silent):
        boundary = absorb_zero_contributions(xp, is_boundary(xp, score, m, opts), m, silent)
        return boundary, merge_choice(xp, n, info, m, boundary, opts.capacity)

    return decide


def fixed_decision(xp, opts: Options, chunk: int):
    """The fixed(C) policy: a slot opens when the tokens summarised so far are a multiple of C.

    sum_i n_i counts the tokens of an initial cache too; the merge is DLA's density
    merge, so the scores still matter (docs/spec/baselines.md).
    """

    def decide(score, m, n, info, silent):  # a schedule: zero contributions count as tokens
        due = xp.sum(n, axis=1) % chunk == 0
        boundary = admit_boundary(xp, due, m, opts.capacity)
        return boundary, merge_choice(xp, n, info, m, boundary, opts.capacity)

    return decide
