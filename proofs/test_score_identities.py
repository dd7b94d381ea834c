"""Identities of the information score (SPEC §3.2, §7).

With B = S_open (the open state after the transition) and A = s_t (score="token")
or S_open + s_t (score="state"), R(X) = X / sqrt(mean(X^2) + eps), and

    I_t = ||R(A) - R(B)||_F / (||R(B)||_F + eps)        (``dla_ref.step.information_score``):

1. Angle. As eps -> 0, for A, B != 0:  I_t = sqrt(2 - 2 cos angle(A, B))  in [0, 2],
   where cos angle(A, B) = <A, B>_F / (||A||_F ||B||_F).
2. Scale-free tau. Hence I_t does not change when A and B are scaled by positive
   factors (independently for score="token", jointly for "state"); in a run,
   scaling q, v (every backbone) or k (linear, mamba2) leaves every I_t unchanged.
3. Three scalars. For any eps > 0 and either score mode, with or without R,
   I_t is a function of ||s_t||^2, ||S_open||^2 and <S_open, s_t> = beta_t k_t^T S_open v_t
   alone: ``dla_ref.step.information_score_from_scalars`` equals ``information_score``.

Derivation: score_identities.md.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref
from dla_ref.records import Options
from dla_ref.step import contribution, information_score, information_score_from_scalars

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


def three_scalar_gap(inputs, score, normalize, eps_scalars=1e-6):
    """max |I from the three scalars - I from the matrices| (matrices with eps = 1e-6)."""
    k, v, beta, S = inputs
    s = contribution(np, k, v, beta, "gdn")
    ss = beta**2 * np.sum(k * k, axis=1) * np.sum(v * v, axis=1)  # ||beta k v^T||^2
    SS = np.sum(S * S, axis=(1, 2))
    sS = beta * np.einsum("nd,nde,ne->n", k, S, v)  # <S, beta k v^T> = beta k^T S v
    size = S.shape[1] * S.shape[2]
    direct = information_score(np, s, S, Options(score=score, normalize=normalize))
    scalars = information_score_from_scalars(
        np, ss, SS, sS, size, Options(score=score, normalize=normalize, eps=eps_scalars))
    return float(np.max(np.abs(scalars - direct) / (1 + direct)))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("score", dla_ref.SCORES)
@settings(max_examples=200)
@given(inputs=score_inputs(decades=(-4.0, 2.0)))
def test_three_scalars_give_the_score(score, normalize, inputs):
    # 1e-7: the expansion of ||R(A) - R(B)||^2 cancels where A ~ B, which costs
    # about sqrt(machine epsilon) = 1.5e-8 in absolute error (see the docstring).
    assert three_scalar_gap(inputs, score, normalize) <= 1e-7


def test_the_check_catches_the_scalars_without_eps():
    """Dropping eps from the scalar formula (the angle formula) is a different score."""
    counterexample(score_inputs(decades=(-4.0, 2.0)),
                   lambda x: three_scalar_gap(x, "token", True, eps_scalars=TINY) > 1e-3)
