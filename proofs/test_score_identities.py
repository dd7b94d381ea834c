"""Identities of the information score (docs/spec/information-score.md).

With B = S_open (the open state after the transition) and A = s_t (score="token")
or S_open + s_t (score="state"), R(X) = X / sqrt(mean(X^2) + eps), and

    I_t = min(||R(A) - R(B)||_F / (||R(B)||_F + eps), 2)   (``dla_ref.step.information_score``):

1. Angle. As eps -> 0, for A, B != 0:  I_t = sqrt(2 - 2 cos angle(A, B))  in [0, 2],
   where cos angle(A, B) = <A, B>_F / (||A||_F ||B||_F).
2. Scale-free tau. Hence I_t does not change when A and B are scaled by positive
   factors (independently for score="token", jointly for "state"); in a run,
   scaling q, v (every backbone) or k (linear, mamba2) leaves every I_t unchanged.
3. Three scalars. For any eps > 0 and either score mode, with or without R,
   I_t is a function of ||s_t||^2, ||S_open||^2 and <S_open, s_t> = beta_t k_t^T S_open v_t
   alone: ``dla_ref.step.information_score_from_scalars`` equals ``information_score``
   within ``score_error_bound``.
4. Its error. From float32 scalars the score is within the float32 ``score_error_bound``;
   the former expanded form is not (state mode).
5. The clamp. Unclamped, I_t <= 2 + sqrt(1 + eps / mean(B^2)) - 1, so min(I_t, 2) moves
   a score by less than eps / (2 mean(B^2)); against a vanished B it is far above 2.
6. Zero contributions. A token with beta_t = 0, k_t = 0 or v_t = 0 is absorbed after a
   stream's first token, whatever tau, and scores 0.

Derivation: score_identities.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dla_ref
from dla_ref.records import Options
from dla_ref import step
from dla_ref.step import (contribution, information_score, information_score_from_scalars,
                          score_error_bound)

from ._cases import counterexample, dla_inputs

TINY = 1e-300  # eps -> 0: negligible against any mean(X^2) a test reaches, yet R stays defined


@st.composite
def score_inputs(draw, decades=(-3.0, 3.0)):
    """(k [N, Dk], v [N, Dv], beta [N], S_open [N, Dk, Dv]), Gaussian with random scales.

    The token and the state get independent scales 10^e, e in ``decades``, so that
    both the scale-free regime and the one where eps matters are reached.
    """
    N, Dk, Dv = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    token_scale, state_scale = (10.0 ** draw(st.floats(*decades)) for _ in range(2))
    return (token_scale * rng.standard_normal((N, Dk)), rng.standard_normal((N, Dv)),
            rng.random(N), state_scale * rng.standard_normal((N, Dk, Dv)))


def compared(s, S, score):
    """The matrices the score compares: (A, B)."""
    return (s if score == "token" else S + s), S


def cosine(A, B):
    """cos angle(A, B) = <A, B>_F / (||A||_F ||B||_F), per stream."""
    dot = np.sum(A * B, axis=(1, 2))
    return dot / (np.linalg.norm(A, axis=(1, 2)) * np.linalg.norm(B, axis=(1, 2)))


def angle_gap(inputs, score, eps):
    """max |I_t^2 - (2 - 2 cos angle(A, B))| over the streams."""
    k, v, beta, S = inputs
    s = contribution(np, k, v, beta, "gdn")
    I = information_score(np, s, S, Options(score=score, eps=eps))
    return float(np.max(np.abs(I**2 - (2 - 2 * cosine(*compared(s, S, score))))))


# --- 1. the angle ----------------------------------------------------------------


@pytest.mark.parametrize("score", dla_ref.SCORES)
@settings(max_examples=200)
@given(inputs=score_inputs())
def test_score_is_the_chord_of_the_angle(score, inputs):
    k, v, beta, S = inputs
    s = contribution(np, k, v, beta, "gdn")
    I = information_score(np, s, S, Options(score=score, eps=TINY))
    assert angle_gap(inputs, score, TINY) <= 1e-12
    assert np.all((I >= 0) & (I <= 2 + 1e-12))


def test_the_angle_needs_eps_to_vanish():
    """With the default eps = 1e-6, small tokens or states leave the chord."""
    counterexample(score_inputs(), lambda x: angle_gap(x, "token", 1e-6) > 1e-3)


# --- 2. scale-free tau -----------------------------------------------------------


def rescaling_gap(inputs, score, normalize, c, d):
    """max |I(c s, d S) - I(s, S)|, the same factor c = d for score="state"."""
    k, v, beta, S = inputs
    s = contribution(np, k, v, beta, "gdn")
    opts = Options(score=score, normalize=normalize, eps=TINY)
    d = c if score == "state" else d
    return float(np.max(np.abs(information_score(np, c * s, d * S, opts)
                               - information_score(np, s, S, opts))))


scales = st.floats(-3.0, 3.0).map(lambda e: 10.0**e)


@pytest.mark.parametrize("score", dla_ref.SCORES)
@settings(max_examples=200)
@given(inputs=score_inputs(), c=scales, d=scales)
def test_score_is_scale_free(score, inputs, c, d):
    assert rescaling_gap(inputs, score, True, c, d) <= 1e-12


def test_without_normalization_the_score_has_a_scale():
    counterexample(st.tuples(score_inputs(), scales, scales),
                   lambda x: rescaling_gap(x[0], "token", False, x[1], x[2]) > 1e-3)


@settings(max_examples=60)
@given(case=dla_inputs(), c=scales, d=scales, e=scales)
def test_scaling_a_run_leaves_every_score_unchanged(case, c, d, e):
    """q by c, v by d, and k by e (not for gdn, whose transition depends on k)."""
    case = dict(case, normalize=True, eps=TINY)
    scaled = dict(case, q=c * case["q"], v=d * case["v"],
                  k=case["k"] if case["backbone"] == "gdn" else e * case["k"])
    run = dla_ref.dla(**case)
    rerun = dla_ref.dla(**scaled, trace=run.trace)  # same partition, scores recomputed
    np.testing.assert_allclose(rerun.trace.scores, run.trace.scores, rtol=1e-9, atol=0)


# --- 3. three scalars ------------------------------------------------------------


def scalars_of(s, S, dtype=np.float64):
    """(||s||^2, ||S||^2, <S, s>) per stream, summed in ``dtype``."""
    s, S = s.astype(dtype), S.astype(dtype)
    return (np.sum(s * s, axis=(1, 2), dtype=dtype), np.sum(S * S, axis=(1, 2), dtype=dtype),
            np.sum(s * S, axis=(1, 2), dtype=dtype))


def three_scalar_excess(inputs, score, normalize, eps_scalars=1e-6):
    """max over streams of |I from the three scalars - I from the matrices| minus the
    float64 bound of ``score_error_bound`` (<= 0: within it). Matrices with eps = 1e-6."""
    k, v, beta, S = inputs
    s = contribution(np, k, v, beta, "gdn")
    size = S.shape[1] * S.shape[2]
    direct = information_score(np, s, S, Options(score=score, normalize=normalize))
    opts = Options(score=score, normalize=normalize, eps=eps_scalars)
    scalars = information_score_from_scalars(np, *scalars_of(s, S), size, opts)
    absolute, relative = score_error_bound(np, *scalars_of(s, S), size, opts, np.float64)
    # the direct form rounds too: a few ulps of its terms, O(1) after normalization
    slack = 1e-13 * (1 + direct) if normalize else 1e-13 * (1 + direct) * (1 + direct)
    return float(np.max(np.abs(scalars - direct) - (absolute + relative * direct + slack)))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("score", dla_ref.SCORES)
@settings(max_examples=200)
@given(inputs=score_inputs(decades=(-4.0, 2.0)))
def test_three_scalars_give_the_score(score, normalize, inputs):
    assert three_scalar_excess(inputs, score, normalize) <= 0


def test_the_check_catches_the_scalars_without_eps():
    """Dropping eps from the scalar formula (the angle formula) is a different score."""
    counterexample(score_inputs(decades=(-4.0, 2.0)),
                   lambda x: three_scalar_excess(x, "token", True, eps_scalars=TINY) > 1e-3)


# --- 4. the error of the three-scalar form in float32 -----------------------------


@st.composite
def block_inputs(draw):
    """(s [1, Dk, Dv], S_open [1, Dk, Dv]) where the score is small: an open block of n
    tokens near one direction and a token near it (or opposite), at random scales.

    This is where a form that subtracts nearly equal numbers fails (issue 15's case is
    Dk = Dv = 1, where R(X) is the sign of X and every score is ~0 or ~2)."""
    Dk, Dv = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = 10.0 ** draw(st.floats(0.0, 3.5))
    direction = np.outer(rng.standard_normal(Dk), rng.standard_normal(Dv))
    noise = 10.0 ** draw(st.floats(-6.0, 0.0))
    S = n * direction + noise * np.sqrt(n) * rng.standard_normal((Dk, Dv))
    s = draw(st.sampled_from([1.0, -1.0])) * direction
    s = s + noise * rng.standard_normal((Dk, Dv)) * 10.0 ** draw(st.floats(-3.0, 0.0))
    scale = 10.0 ** draw(st.floats(-2.0, 2.0))
    return (scale * s)[None].astype(np.float32), (scale * S)[None].astype(np.float32)


def float32_excess(inputs, score, form):
    """|I from float32 scalars - I from the float64 matrices| over the float32 bound
    (> 1: outside it). ``form`` computes I from (ss, SS, sS, size, opts)."""
    s, S = inputs
    size = S.shape[1] * S.shape[2]
    opts = Options(score=score)
    want = information_score(np, s.astype(np.float64), S.astype(np.float64), opts)
    got = form(*scalars_of(s, S, np.float32), np.float32(size), opts)
    absolute, relative = score_error_bound(np, *scalars_of(s, S), size, opts, np.float32)
    return float(np.max(np.abs(got - want) / (absolute + relative * want)))


def new_form(ss, SS, sS, size, opts):
    return information_score_from_scalars(np, ss, SS, sS, size, opts)


def expanded_form(ss, SS, sS, size, opts):
    """The former scalar form: r_A^2 ||A||^2 - 2 r_A r_B <A, B> + r_B^2 ||B||^2, which
    subtracts O(size) terms in state mode too."""
    AA, AB = (ss, sS) if opts.score == "token" else (SS + 2 * sS + ss, SS + sS)
    rA, rB = 1 / np.sqrt(AA / size + opts.eps), 1 / np.sqrt(SS / size + opts.eps)
    radicand = np.maximum(rA * rA * AA - 2 * rA * rB * AB + rB * rB * SS, 0)
    return np.minimum(np.sqrt(radicand) / (rB * np.sqrt(SS) + opts.eps), 2)


# A token that cancels its one-token state: the float32 scalars give ||A||^2 < 0 unless
# the form keeps it >= 0 (found by the random profile).
CANCELLING = (np.array([[[-2.8393278, -1.142012, 4.503489, -3.128815, -1.5425401]]], np.float32),
              np.array([[[2.8393288, 1.1419964, -4.503469, 3.128796, 1.5426028]]], np.float32))


@pytest.mark.parametrize("score", dla_ref.SCORES)
@settings(max_examples=300)
@given(inputs=block_inputs())
@example(inputs=CANCELLING)
def test_float32_scalars_stay_within_the_error_bound(score, inputs):
    assert float32_excess(inputs, score, new_form) <= 1


def test_the_expanded_form_breaks_the_bound_in_state_mode():
    """The bound is tight enough to tell the forms apart: the former expansion, which
    cancels where R(S_open + s_t) ~ R(S_open), leaves it in float32."""
    counterexample(block_inputs(), lambda x: float32_excess(x, "state", expanded_form) > 1)


# --- 5. the clamp ----------------------------------------------------------------


def unclamped_score(s, S, score, eps=1e-6):
    """The definition without the clamp, written out: ||R(A) - R(B)|| / (||R(B)|| + eps)."""
    A = s if score == "token" else S + s
    R = [X / np.sqrt(np.mean(X * X, axis=(1, 2)) + eps)[:, None, None] for X in (A, S)]
    return (np.linalg.norm(R[0] - R[1], axis=(1, 2))
            / (np.linalg.norm(R[1], axis=(1, 2)) + eps))


@pytest.mark.parametrize("score", dla_ref.SCORES)
@settings(max_examples=200)
@given(inputs=score_inputs(decades=(-4.0, 2.0)))
def test_the_clamp_moves_a_score_by_at_most_its_range_excess(score, inputs):
    """I_t = min(I_raw, 2), and I_raw <= 2 + sqrt(1 + eps / mean(B^2)) - 1: the clamp
    changes nothing by more than eps / (2 mean(B^2))."""
    k, v, beta, S = inputs
    s = contribution(np, k, v, beta, "gdn")
    raw = unclamped_score(s, S, score)
    np.testing.assert_allclose(information_score(np, s, S, Options(score=score)),
                               np.minimum(raw, 2), rtol=1e-12, atol=0)
    excess = np.sqrt(1 + 1e-6 / np.mean(S * S, axis=(1, 2))) - 1
    assert np.all(raw <= 2 + excess + 1e-12)


def test_a_vanished_open_state_scores_far_above_2_unclamped():
    """What the clamp is for: against an open state with mean(B^2) << eps the raw score
    is up to sqrt(Dk Dv) / eps, a number set by rounding noise."""
    counterexample(score_inputs(decades=(-7.0, 0.0)),
                   lambda x: np.max(unclamped_score(contribution(np, *x[:3], "gdn"), x[3],
                                                    "token")) > 100)


# --- 6. zero contributions --------------------------------------------------------


@st.composite
def runs_with_zero_contributions(draw):
    """A ``dla_inputs`` case with beta (gdn), k or v zeroed at random tokens, and tau
    drawn down to -inf (where every other token opens a slot)."""
    case = draw(dla_inputs())
    case["tau"] = draw(st.sampled_from([-math.inf, 0.0, case["tau"]]))
    B, T, H = case["q"].shape[:3]
    silent = np.zeros((B, T, H), bool)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for name in ("k", "v") + (("beta",) if case["backbone"] == "gdn" else ()):
        zero = rng.random((B, T, H)) < 0.3
        case[name] = np.where(zero[..., None] if name != "beta" else zero, 0.0, case[name])
        silent |= zero
    return case, silent


def zero_contributions_opened(case, silent):
    """Whether some zero contribution after a stream's first token opened a slot or
    scored != 0."""
    trace = dla_ref.dla(**case).trace
    later = silent.copy()
    later[:, 0] = False  # token 0 opens slot 0 of an empty cache
    return bool(np.any(trace.boundary[later]) or np.any(trace.scores[later] != 0))


@settings(max_examples=100)
@given(drawn=runs_with_zero_contributions())
def test_a_zero_contribution_is_absorbed_with_score_zero(drawn):
    assert not zero_contributions_opened(*drawn)


def test_without_the_rule_a_zero_contribution_opens_a_slot(monkeypatch):
    """The check has teeth: without the rule, tau <= 0 opens a slot at a zero token."""
    monkeypatch.setattr(step, "absorb_zero_contributions", lambda xp, b, m, silent: b)
    counterexample(runs_with_zero_contributions(),
                   lambda drawn: zero_contributions_opened(*drawn))
