"""Merge and transition commute (docs/spec/backbones.md): their order inside a step is free.

Statement. For every backbone, every cache S [N, K, Dk, Dv] and every merge
choice j in {-1 (none), 0, ..., K-2} per stream,

    merge_adjacent(transition(S), j) = transition(merge_adjacent(S, j)),

i.e. applying G_t to every slot and then merging slots j, j+1 gives the same states
as merging first. So an implementation may decay the cache before or after it
merges, and a merged state needs no record of when its parts were merged.

Derivation: merge_transition.md.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref
from dla_ref.step import merge_adjacent, transition

from ._cases import TOL, counterexample, relative_error


@st.composite
def caches(draw):
    """(S [N, K, Dk, Dv], j [N], k [N, Dk], alpha [N], beta [N], backbone), seeded values."""
    N, K = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    Dk, Dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal((N, K, Dk, Dv)),
            rng.integers(-1, K - 1, size=N),  # -1 = no merge; K = 1 allows only that
            rng.standard_normal((N, Dk)),
            np.exp(-rng.exponential(size=N)),
            rng.random(N),
            draw(st.sampled_from(dla_ref.BACKBONES)))


def order_gap(case, apply_G=transition):
    """Relative difference between transition-then-merge and merge-then-transition."""
    S, j, k, alpha, beta, backbone = case
    G = lambda X: apply_G(np, X, k, alpha, beta, backbone)  # noqa: E731
    return relative_error(merge_adjacent(np, G(S), j), G(merge_adjacent(np, S, j)))


@settings(max_examples=300)
@given(caches())
def test_merge_and_transition_commute(case):
    assert order_gap(case) <= TOL


def slot_dependent_transition(xp, S, k, alpha, beta, backbone):
    """A transition outside the statement: slot i decays by an extra alpha^i (older slots
    forget faster). It is no longer one G_t applied to every slot."""
    per_slot = alpha[:, None] ** xp.arange(S.shape[1])[None, :]
    return per_slot[:, :, None, None] * transition(xp, S, k, alpha, beta, backbone)


def test_the_check_catches_a_slot_dependent_transition():
    counterexample(caches(), lambda case: order_gap(case, slot_dependent_transition) > TOL)
