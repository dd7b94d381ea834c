"""The budget of each score I_t and each J: the error bound of the score, token by token.

A kernel may form I_t from three scalars (||s_t||^2, ||S_open||^2, <S_open, s_t>) in its
state dtype; ``dla_ref.step.score_error_bound`` states how far that may be from I_t, an
absolute part that depends on the scalars (large only where a token-mode score cancels,
near I_t = 0) and a relative part. The budget of a score is that bound, evaluated on the
scalars of the reference replaying the candidate's trace, plus the ``ScoreBound`` of the
state dtype (the state's own rounding over the case's tokens), plus, for an
implementation that declares ``score_scalars="recurrent"`` (its ||S_open||^2 and
<S_open, s_t> follow recurrences and prefix sums, as torch-chunked's do), the rounding of
those recurrences carried through the score (``recurrent_scalar_bound``). So a kernel whose score
loses digits the bound does not allow (issue 15's cancelling float32 expansion) fails,
and one within it passes. See docs/testing-your-kernel.md.
"""

from __future__ import annotations

import numpy as np

import dla_ref
from dla_ref.records import Tokens
from dla_ref.recurrent import prepare, replay
from dla_ref.step import (MAX_SCORE, contribution, information_score_from_scalars, open_state,
                          score_error_bound, score_terms, step, transition, zero_contribution)
from dla_ref.validation import check_options

from .. import registry
from .backends import Candidate
from .cases import Case
from .tolerances import Tolerance

# The dtype whose rounding ``score_error_bound`` assumes, per state dtype. NumPy has no
# bfloat16; no kernel keeps its state in it, and the bfloat16 row's ScoreBound (0.1)
# exceeds any bound of float16 scalars anyway.
SCALAR_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16,
                 "bfloat16": np.float16}


def replay_scalars(case: Case, trace: dla_ref.Trace) -> tuple[np.ndarray, ...]:
    """(ss, SS, sS, scored, SS_terms, sS_terms) [B, T, H]: ||s_t||^2, ||S_open||^2,
    <S_open, s_t> of the reference replaying ``trace`` (float64), S_open the open state
    after the transition; where I_t is computed at all (m > 0 and a contribution that is
    not zero; else a rule sets I_t = 0); and the magnitudes of the terms that recurrences
    for ||S_open||^2 and <S_open, s_t> sum (``recurrence_terms``)."""
    opts = check_options(eps=dla_ref.Options.eps, **case.options)
    args = case.arguments()
    xp, (B, T, H), tokens, cache = prepare(
        args["q"], args["k"], args["v"], args["lam"], args["log_alpha"], args["beta"], opts,
        args["initial_cache"], None)
    decide_at = replay(xp, trace, B, T, H, opts)
    scalars = np.empty((6, B * H, T))
    # The initial cache's open state is one term of each recurrence (summed directly).
    start = np.sum(np.square(open_state(xp, cache[0], cache[3])), axis=(1, 2))
    terms = (start, np.sqrt(start))
    for t in range(T):
        token = Tokens(*(None if x is None else x[:, t] for x in tokens))
        S = transition(xp, cache[0], token.k, token.alpha, token.beta, opts.backbone)
        s = contribution(xp, token.k, token.v, token.beta, opts.backbone)
        S_open = open_state(xp, S, cache[3])
        scalars[:3, :, t] = [np.sum(x * y, axis=(1, 2)) for x, y in
                             ((s, s), (S_open, S_open), (S_open, s))]
        scalars[3, :, t] = (cache[3] > 0) & ~zero_contribution(
            xp, token.k, token.v, token.beta, opts.backbone)
        alpha = 1.0 if token.alpha is None else token.alpha
        scalars[4, :, t] = alpha * alpha * terms[0]
        scalars[5, :, t] = alpha * terms[1] * np.sqrt(scalars[0, :, t])
        opens = np.reshape(np.asarray(trace.boundary)[:, t, :], (B * H,))
        terms = recurrence_terms(scalars[4, :, t], alpha * terms[1], scalars[0, :, t],
                                 scalars[5, :, t], opens)
        cache = step(xp, cache, token, opts, decide_at(t))[0]
    return tuple(np.transpose(np.reshape(x, (B, H, T)), (0, 2, 1)) for x in scalars)


def recurrence_terms(SS_terms, reach, ss, sS_terms, opens):
    """The magnitudes of the terms of the recurrences after token t.   -> (M', N') [N]

    A chunked kernel forms <S_open, s_t> as a difference of prefix sums of
    exp(L_t - L_r) <s_r, s_t> over the tokens before t (and <S_0, s_t> decayed), so its
    rounding scales with sS_terms = ||s_t|| N_t >= that sum of magnitudes (Cauchy-Schwarz),
    N_t = alpha_t (N_{t-1} + ||s_{t-1}||) the decayed sum of the earlier norms (``reach``
    is alpha_t N_{t-1}; no reset at a boundary: the prefix sums run over the whole
    history a kit cannot split into chunks). It forms ||S_open||^2 by

        ||alpha (B + s)||^2 = alpha^2 (||B||^2 + 2 <B, s> + ||s||^2)

    over the open block, so its rounding scales with SS_terms = M_t (already times the
    block's decays): M' = ||s_t||^2 where token t opens a slot (its open state is s_t),
    else M_t + 2 sS_terms + ||s_t||^2 (the dot's own rounding enters through 2 <B, s>).
    The next token's are alpha^2 M' and alpha N' (gdn's I - beta k k^T is a contraction,
    so these bound it too)."""
    return np.where(opens, ss, SS_terms + 2 * sS_terms + ss), reach + np.sqrt(ss)


def score_scalars(candidate: Candidate) -> str:
    """How the candidate obtains its three scalars: its registry entry's ``score_scalars``
    ("direct" for a callable outside the registry, which declares nothing)."""
    if candidate.implementation is None:
        return "direct"
    return registry.get(candidate.implementation).score_scalars


def scalar_score_bound(state_dtype: str, case: Case, trace: dla_ref.Trace,
                       scores: np.ndarray, scalars: str = "direct") -> np.ndarray:
    """``score_error_bound`` [B, T, H] for scalars of the state dtype, at the scalars and
    scores of the reference replaying ``trace``, plus ``recurrent_scalar_bound`` where the
    implementation obtains its scalars by recurrences (``scalars`` "recurrent", the
    registry's ``score_scalars``). Scores fixed by a rule (I_0 = 0, a zero contribution)
    are exact on both sides, and their bound is 0."""
    ss, SS, sS, scored, SS_terms, sS_terms = replay_scalars(case, trace)
    opts = check_options(eps=dla_ref.Options.eps, **case.options)
    size = case.q.shape[3] * case.v.shape[3]
    dtype = SCALAR_DTYPES[state_dtype]
    absolute, relative = score_error_bound(np, ss, SS, sS, size, opts, dtype)
    bound = absolute + relative * np.abs(scores)
    if scalars == "recurrent":
        bound = bound + recurrent_scalar_bound(ss, SS, sS, (SS_terms, sS_terms), size, opts,
                                               dtype)
    elif scalars != "direct":
        raise ValueError(f"scalars must be 'direct' or 'recurrent', got {scalars!r}")
    if opts.normalize:
        t1, t2, t3, den = score_terms(np, ss, SS, sS, size, opts)
        bound = through_the_clamp(bound, np.sqrt(np.maximum(t1 + t2 + t3, 0)) / den)
    return np.where(scored > 0, bound, 0.0)


def recurrent_scalar_bound(ss, SS, sS, terms, size, opts, dtype) -> np.ndarray:
    """How far I_t moves when SS = ||S_open||^2 and sS = <S_open, s_t> carry the rounding
    of recurrences.   [N]

    A recurrence rounds in proportion to the magnitudes of the terms it sums, ``terms`` =
    (M, D) of ``recurrence_terms``, not to its result: Delta_SS = c u M, Delta_sS = c u D,
    c = 4 + sqrt(size), u = eps(dtype)/2 (the c of ``score_error_bound``: its dot
    products are sums of size products).

    Through the score I = sqrt(R) / den, R = t_1 + t_2 + t_3 (``score_terms``):

        dI/dSS = (dR/dSS) / (2 I den^2) - I (d den/dSS) / den,
        dI/dsS = (dR/dsS) / (2 I den^2),

    and in token mode, with r_B = (SS/size + eps)^(-1/2), dr_B/dSS = -r_B^3 / (2 size):
    dR/dSS = r_A r_B^3 sS / size + r_B^4 eps, d den/dSS = r_B^3 eps / (2 sqrt(SS)),
    dR/dsS = -2 r_A r_B (unnormalized, r = 1: dR/dSS = 1, d den/dSS = 1 / (2 sqrt(SS))).
    Where I -> 0 (a token aligned with the open state, the case that exposed this) these
    grow like 1 / I and the linear bound fails; the change of R counts there,
    |Delta I| <= sqrt(|Delta R|) / den, as in ``score_error_bound``'s min(sqrt, /I). Both
    regimes, and state mode (where SS and sS enter r_A, r_B and d too), are covered by the
    secant itself, evaluated in float64 at the corners: max |I(SS +- Delta_SS,
    sS +- Delta_sS) - I(SS, sS)|.
    """
    c_u = (4 + size**0.5) * (np.finfo(dtype).eps / 2)
    at = information_score_from_scalars(np, ss, SS, sS, size, opts)
    moved = [information_score_from_scalars(np, ss, np.maximum(SS + a * c_u * terms[0], 0.0),
                                            sS + b * c_u * terms[1], size, opts)
             for a in (1, -1) for b in (1, -1)]
    return np.max([np.abs(x - at) for x in moved], axis=0)


def through_the_clamp(bound: np.ndarray, unclamped: np.ndarray) -> np.ndarray:
    """The bound of min(I, 2) given that of I: 0 where even I - bound >= 2 (both sides
    are clamped to exactly 2), else at most 2 (both lie in [0, 2]). A score against a
    vanished open state (of about ||R(s_t)|| / eps) has a huge bound before the clamp
    and none after it."""
    bound = np.minimum(bound, MAX_SCORE)
    return np.where(unclamped - bound >= MAX_SCORE, 0.0, bound)


def budgets(tol: Tolerance, state_dtype: str, case: Case, want: dla_ref.Result,
            trace: dla_ref.Trace, scalars: str = "direct") -> tuple[np.ndarray, np.ndarray]:
    """The budgets of the scores [B, T, H] and of J [B, H, K], ``want`` being the
    reference's replay of ``trace``; ``scalars`` how the candidate obtains its scalars
    (``score_scalars``).

    A score: the scalar bound plus ``tol.score``. A J sums n scores, which ones following
    from merges: n times the stream's largest scalar bound, plus ``tol.score.of_info``.
    """
    bound = scalar_score_bound(state_dtype, case, trace, want.trace.scores, scalars)
    scores = bound + tol.score.of_scores(want.trace.scores)
    largest = np.max(bound, axis=1, initial=0.0)[:, :, None]  # [B, H, 1]
    info = want.cache.n * largest + tol.score.of_info(want.cache.info, want.cache.n)
    return scores, info
