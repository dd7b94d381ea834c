"""The budget of each score I_t and each J: the error bound of the score, token by token.

A kernel may form I_t from three scalars (||s_t||^2, ||S_open||^2, <S_open, s_t>) in its
state dtype; ``dla_ref.step.score_error_bound`` states how far that may be from I_t, an
absolute part that depends on the scalars (large only where a token-mode score cancels,
near I_t = 0) and a relative part. The budget of a score is that bound, evaluated on the
scalars of the reference replaying the candidate's trace, plus the ``ScoreBound`` of the
state dtype (the state's own rounding over the case's tokens). So a kernel whose score
loses digits the bound does not allow (issue 15's cancelling float32 expansion) fails,
and one within it passes. See docs/testing-your-kernel.md.
"""

from __future__ import annotations

import numpy as np

import dla_ref
from dla_ref.records import Tokens
from dla_ref.recurrent import prepare, replay
from dla_ref.step import (MAX_SCORE, contribution, open_state, score_error_bound, score_terms,
                          step, transition, zero_contribution)
from dla_ref.validation import check_options

from .cases import Case
from .tolerances import Tolerance

# The dtype whose rounding ``score_error_bound`` assumes, per state dtype. NumPy has no
# bfloat16; no kernel keeps its state in it, and the bfloat16 row's ScoreBound (0.1)
# exceeds any bound of float16 scalars anyway.
SCALAR_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16,
                 "bfloat16": np.float16}


def replay_scalars(case: Case, trace: dla_ref.Trace) -> tuple[np.ndarray, ...]:
    """(ss, SS, sS, scored) [B, T, H]: ||s_t||^2, ||S_open||^2, <S_open, s_t> of the
    reference replaying ``trace`` (float64), S_open the open state after the transition,
    and where I_t is computed at all (m > 0 and a contribution that is not zero; else
    a rule sets I_t = 0)."""
    opts = check_options(eps=dla_ref.Options.eps, **case.options)
    args = case.arguments()
    xp, (B, T, H), tokens, cache = prepare(
        args["q"], args["k"], args["v"], args["lam"], args["log_alpha"], args["beta"], opts,
        args["initial_cache"], None)
    decide_at = replay(xp, trace, B, T, H, opts)
    scalars = np.empty((4, B * H, T))
    for t in range(T):
        token = Tokens(*(None if x is None else x[:, t] for x in tokens))
        S = transition(xp, cache[0], token.k, token.alpha, token.beta, opts.backbone)
        s = contribution(xp, token.k, token.v, token.beta, opts.backbone)
        S_open = open_state(xp, S, cache[3])
        scalars[:3, :, t] = [np.sum(x * y, axis=(1, 2)) for x, y in
                             ((s, s), (S_open, S_open), (S_open, s))]
        scalars[3, :, t] = (cache[3] > 0) & ~zero_contribution(
            xp, token.k, token.v, token.beta, opts.backbone)
        cache = step(xp, cache, token, opts, decide_at(t))[0]
    return tuple(np.transpose(np.reshape(x, (B, H, T)), (0, 2, 1)) for x in scalars)


def scalar_score_bound(state_dtype: str, case: Case, trace: dla_ref.Trace,
                       scores: np.ndarray) -> np.ndarray:
    """``score_error_bound`` [B, T, H] for scalars of the state dtype, at the scalars and
    scores of the reference replaying ``trace``. Scores fixed by a rule (I_0 = 0, a zero
    contribution) are exact on both sides, and their bound is 0."""
    ss, SS, sS, scored = replay_scalars(case, trace)
    opts = check_options(eps=dla_ref.Options.eps, **case.options)
    size = case.q.shape[3] * case.v.shape[3]
    absolute, relative = score_error_bound(np, ss, SS, sS, size, opts,
                                           SCALAR_DTYPES[state_dtype])
    bound = absolute + relative * np.abs(scores)
    if opts.normalize:
        t1, t2, t3, den = score_terms(np, ss, SS, sS, size, opts)
        bound = through_the_clamp(bound, np.sqrt(np.maximum(t1 + t2 + t3, 0)) / den)
    return np.where(scored > 0, bound, 0.0)


def through_the_clamp(bound: np.ndarray, unclamped: np.ndarray) -> np.ndarray:
    """The bound of min(I, 2) given that of I: 0 where even I - bound >= 2 (both sides
    are clamped to exactly 2), else at most 2 (both lie in [0, 2]). A score against a
    vanished open state (of about ||R(s_t)|| / eps) has a huge bound before the clamp
    and none after it."""
    bound = np.minimum(bound, MAX_SCORE)
    return np.where(unclamped - bound >= MAX_SCORE, 0.0, bound)


def budgets(tol: Tolerance, state_dtype: str, case: Case, want: dla_ref.Result,
            trace: dla_ref.Trace) -> tuple[np.ndarray, np.ndarray]:
    """The budgets of the scores [B, T, H] and of J [B, H, K], ``want`` being the
    reference's replay of ``trace``.

    A score: the scalar bound plus ``tol.score``. A J sums n scores, which ones following
    from merges: n times the stream's largest scalar bound, plus ``tol.score.of_info``.
    """
    bound = scalar_score_bound(state_dtype, case, trace, want.trace.scores)
    scores = bound + tol.score.of_scores(want.trace.scores)
    largest = np.max(bound, axis=1, initial=0.0)[:, :, None]  # [B, H, 1]
    info = want.cache.n * largest + tol.score.of_info(want.cache.info, want.cache.n)
    return scores, info
