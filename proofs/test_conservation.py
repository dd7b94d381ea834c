"""Conservation (docs/spec/backbones.md): DLA's slots add up to the single-state backbone.

Statement. For every backbone, capacity K >= 1, threshold tau, score mode and
input, at every token t

    sum_{i < m(t)} S_i(t) = S_t,    where S_t = G_t S_{t-1} + s_t, S_{-1} = 0,

is the state of the plain backbone (``dla_ref.single``). Hence, with every
readout weight lam = 1, DLA's output is the plain backbone's output:
o_t = q_t^T sum_i S_i(t) = q_t^T S_t.

Derivation: conservation.md.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

import dla_ref
from dla_ref import step

from ._cases import TOL, backbone_args, counterexample, dla_inputs, prefix, relative_error


def slot_sum_error(case):
    """max over t of the relative error of sum_i S_i(t) against the backbone's S_t."""
    T = case["q"].shape[1]
    errors = []
    for t in range(1, T + 1):  # the final cache of every prefix: the state at every t
        cut = prefix(case, t)
        slots = dla_ref.dla(**cut).cache.S  # [B, H, K, Dk, Dv]
        plain = dla_ref.single(cut["q"], cut["k"], cut["v"], **backbone_args(cut)).cache.S
        errors.append(relative_error(np.sum(slots, axis=2), plain[:, :, 0]))
    return max(errors)


def unit_weight_output_error(case):
    """Relative error of DLA's output with lam = 1 against the backbone's output."""
    ones = dict(case, lam=np.ones_like(case["lam"]))
    plain = dla_ref.single(case["q"], case["k"], case["v"], **backbone_args(case))
    return relative_error(dla_ref.dla(**ones).o, plain.o)


@settings(max_examples=60)
@given(dla_inputs())
def test_slots_sum_to_the_backbone_state_at_every_token(case):
    assert slot_sum_error(case) <= TOL


@settings(max_examples=100)
@given(dla_inputs())
def test_unit_weights_give_the_backbone_output(case):
    assert unit_weight_output_error(case) <= TOL


real_merge = step.merge_adjacent


def averaging_merge(xp, x, j, fill=0):
    """A plausible misreading: the merged state is the mean of the pair, not its sum."""
    merged = real_merge(xp, x, j, fill)
    if x.ndim < 4:  # counts and scores still add up; only the states are averaged
        return merged
    pair = xp.arange(x.shape[1])[None, :, None, None] == j[:, None, None, None]
    return xp.where(pair, merged / 2, merged)


def test_the_check_catches_a_merge_that_averages(monkeypatch):
    monkeypatch.setattr(step, "merge_adjacent", averaging_merge)
    counterexample(dla_inputs(), lambda case: slot_sum_error(case) > TOL)
