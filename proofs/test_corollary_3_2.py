"""Corollary 3.2 (paper): blocks should not straddle change points.

A sequence is piecewise stationary with change points c_1 < ... < c_{M-1} when its
segments [c_j, c_{j+1}) are drawn from different distributions; it is piecewise
constant when u_t = mu_j on segment j, with mu_{j+1} != mu_j. A partition is
aligned when every change point starts a block; a block straddles c when it holds
both c - 1 and c. B(pi) is Theorem 3.1's bound with ||q|| = 1
(``dla_ref.deviation_bound``).

Statement, in two forms.
(a) Piecewise constant: every aligned partition has B = 0, and every partition
    with a block that straddles c has B >= ||mu_c - mu_{c-1}|| > 0 (the jump at c).
(b) Any sequence, in particular a noisy piecewise-stationary one: cutting a block
    at a point c inside it never raises B, and lowers it strictly when the means of
    the two parts differ. So among partitions that differ by such a cut, the one
    aligned with the change point has the strictly smaller bound.

Derivation: corollary_3_2.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref

from ._cases import counterexample


class Case(NamedTuple):
    """A piecewise-stationary sequence and two partitions that differ at change points.

    u [T, D]; change_points: the first token of every segment but the first;
    cuts: other block starts; straddled: a non-empty subset of change_points.
    """

    u: np.ndarray
    change_points: list
    cuts: set
    straddled: set

    def aligned(self):
        """Block starts: 0, the cuts and every change point."""
        return np.array(sorted({0, *self.cuts, *self.change_points}))

    def straddling(self):
        """The aligned partition without the straddled change points."""
        return np.array(sorted({0, *self.cuts, *self.change_points} - self.straddled))


@st.composite
def segmented(draw, noises=(0.0, 0.1, 1.0), real_changes=True, max_segments=4,
              max_length=5, max_D=3):
    """A Case: u = segment level + noise * N(0, 1), noise drawn from ``noises``.

    The levels are a random walk with Gaussian steps: every change is real, unless
    ``real_changes`` is False, when some steps are zero.
    """
    M, D = draw(st.integers(2, max_segments)), draw(st.integers(1, max_D))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = rng.integers(1, max_length + 1, size=M)
    steps = rng.standard_normal((M, D))
    if not real_changes:
        steps *= rng.integers(0, 2, size=(M, 1))
    levels = np.repeat(np.cumsum(steps, axis=0), lengths, axis=0)
    u = levels + draw(st.sampled_from(noises)) * rng.standard_normal(levels.shape)
    T = len(u)
    change_points = [int(c) for c in np.cumsum(lengths)[:-1]]
    cuts = {int(c) for c in rng.integers(1, T, size=rng.integers(0, T))}
    straddled = {int(c) for c in rng.choice(change_points, replace=False,
                                            size=rng.integers(1, M))}
    return Case(u, change_points, cuts, straddled)


@settings(max_examples=200)
@given(segmented(noises=(0.0,)))
def test_piecewise_constant_aligned_is_free_straddling_is_not(case):
    u = case.u
    rounding = 1e-12 * len(u) * max(1.0, float(np.max(np.abs(u))))  # block means round
    assert dla_ref.deviation_bound(u, case.aligned()) <= rounding
    largest_jump = max(float(np.linalg.norm(u[c] - u[c - 1])) for c in case.straddled)
    assert dla_ref.deviation_bound(u, case.straddling()) >= largest_jump * (1 - 1e-9)


def cut_effect(case):
    """(B(pi), B(pi + c)): the bound before and after cutting the straddling partition
    at one straddled change point c."""
    coarse = case.straddling()
    fine = np.array(sorted({*coarse.tolist(), min(case.straddled)}))
    return dla_ref.deviation_bound(case.u, coarse), dla_ref.deviation_bound(case.u, fine)


@settings(max_examples=200)
@given(segmented())
def test_cutting_at_a_change_point_lowers_the_bound(case):
    # Gaussian steps make the part means differ, and the between-part term they add is
    # far above rounding: the drop is strict by a clear relative margin
    before, after = cut_effect(case)
    assert after < before * (1 - 1e-9)


@settings(max_examples=200)
@given(segmented(), st.data())
def test_cutting_anywhere_never_raises_the_bound(case, data):
    u, starts = case.u, case.straddling()
    cut = data.draw(st.integers(1, len(u) - 1))  # T >= 2: at least two segments
    finer = np.array(sorted({*starts.tolist(), cut}))
    assert dla_ref.deviation_bound(u, finer) <= dla_ref.deviation_bound(u, starts) * (1 + 1e-12)


def test_the_check_catches_change_points_that_are_not_real():
    """Where the level does not change, straddling costs nothing: (a) and (b) need real changes."""
    counterexample(segmented(noises=(0.0,), real_changes=False),
                   lambda case: cut_effect(case)[1] >= cut_effect(case)[0] * (1 - 1e-9))
