"""Theorem 3.1 (paper): what summarising blocks by their means can cost a readout.

Statement. Let u_0 ... u_{T-1} in R^D be additive token contributions, pi a
partition of 0 ... T-1 into contiguous blocks C_i, u_bar_i the mean of block i,
q in R^D and w in R^T with |w_t| <= 1. With

    y(q)     = sum_t w_t <q, u_t>,
    y~_pi(q) = sum_i sum_{t in C_i} w_t <q, u_bar_i>,

    |y(q) - y~_pi(q)| <= ||q||_2 * sum_i sqrt(|C_i|) * sqrt(sum_{t in C_i} ||u_t - u_bar_i||_2^2),

and the right side (``dla_ref.deviation_bound``) also bounds the worst case over w
(``dla_ref.deviation`` with w=None). The bound is attained, so no smaller constant
holds for all inputs: when every residual u_t - u_bar_i is +-a_i q with a balanced
sign pattern inside each block, the worst-case deviation equals the bound.

Derivation and the bound's tightness on typical inputs: theorem_3_1.md; the table
there is printed by ``python -m proofs.test_theorem_3_1``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dla_ref

from ._cases import counterexample

# The bound's computation rounds differently from the deviation's: relative slack only.
SLACK = 1e-10


@st.composite
def partitioned(draw, max_T=12, max_D=4):
    """(u [T, D], starts [M], q [D], w [T]): any values, any partition, any |w_t| <= 1."""
    T, D = draw(st.integers(1, max_T)), draw(st.integers(1, max_D))
    # below 1e-100 squares underflow, a floating-point matter outside the theorem
    values = st.floats(-10, 10).filter(lambda x: x == 0 or abs(x) >= 1e-100)
    u = draw(hnp.arrays(np.float64, (T, D), elements=values))
    cuts = draw(st.sets(st.integers(1, T - 1))) if T > 1 else set()
    q = draw(hnp.arrays(np.float64, (D,), elements=values))
    w = draw(hnp.arrays(np.float64, (T,), elements=st.floats(-1, 1)))
    return u, np.array([0, *sorted(cuts)]), q, w


@settings(max_examples=300)
@given(partitioned())
def test_bound_holds_for_any_weights_and_in_the_worst_case(case):
    u, starts, q, w = case
    bound = dla_ref.deviation_bound(u, starts, q) * (1 + SLACK)
    assert dla_ref.deviation(u, starts, q, w) <= bound
    assert dla_ref.deviation(u, starts, q) <= bound


@st.composite
def extremal(draw, max_blocks=4, max_D=4):
    """(u, starts, q) with residuals +-a_i q, half of each (even-sized) block of each sign."""
    D, M = draw(st.integers(1, max_D)), draw(st.integers(1, max_blocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sizes = 2 * rng.integers(1, 4, size=M)
    q = rng.standard_normal(D)
    blocks = [rng.standard_normal(D) + rng.standard_normal() * rng.permutation(
        np.repeat([1.0, -1.0], n // 2))[:, None] * q for n in sizes]
    return np.concatenate(blocks), np.cumsum(sizes) - sizes, q


@settings(max_examples=100)
@given(extremal())
def test_bound_is_attained(case):
    u, starts, q = case
    np.testing.assert_allclose(dla_ref.deviation(u, starts, q),
                               dla_ref.deviation_bound(u, starts, q), rtol=1e-12)


def bound_without_block_sizes(u, starts, q):
    """A wrong variant: ||q|| sum_i sqrt(sum_{t in C_i} ||u_t - u_bar_i||^2), no sqrt(|C_i|)."""
    ends = [*starts[1:], u.shape[0]]
    return sum(dla_ref.deviation_bound(u[a:b], [0], q) / np.sqrt(b - a)
               for a, b in zip(starts, ends))


def test_the_check_catches_a_bound_without_block_sizes():
    counterexample(partitioned(), lambda case: dla_ref.deviation(*case[:3])
                   > bound_without_block_sizes(*case[:3]) * (1 + SLACK))


# --- how tight on typical inputs (the table of theorem_3_1.md) ----------------------


def typical_ratios(D, block, T=256, trials=20, seed=0):
    """Median of bound / deviation for Gaussian u_t, q and equal blocks of ``block`` tokens.

    -> (worst case over w, w_t uniform in [-1, 1]).
    """
    rng = np.random.default_rng(seed)
    starts = np.arange(0, T, block)
    worst, uniform = [], []
    for _ in range(trials):
        u, q = rng.standard_normal((T, D)), rng.standard_normal(D)
        bound = dla_ref.deviation_bound(u, starts, q)
        worst.append(bound / dla_ref.deviation(u, starts, q))
        uniform.append(bound / dla_ref.deviation(u, starts, q, rng.uniform(-1, 1, T)))
    return float(np.median(worst)), float(np.median(uniform))


if __name__ == "__main__":
    print("| D | block | bound / worst-case deviation | bound / deviation, w ~ U[-1, 1] |")
    print("|---:|---:|---:|---:|")
    for D in (1, 16, 256):
        for block in (2, 8, 32):
            worst, uniform = typical_ratios(D, block)
            print(f"| {D} | {block} | {worst:.2f} | {uniform:.1f} |")
