"""Recurrent = materialized (docs/spec/materialized.md): two definitions of DLA's output agree.

Statement. Let a recurrent run (``dla_ref.dla``, docs/spec/boundaries.md) produce outputs o_t and a
trace. For every backbone and both slot orders, the materialized form of that
trace (``dla_ref.materialized``) gives the same outputs:

    o_t = sum_{s <= t} Lambda[t, s] * (q_t^T P_{t,s} k~_s) * v_s,

P_{t,s} = G_t ... G_{s+1}, k~_s = beta_s k_s (gdn) or k_s, and Lambda[t, s] =
lam_t[l(i)] for the slot i that holds token s at time t (l(i) = i oldest-first,
m - 1 - i newest-first).

Derivation: recurrent_materialized.md.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref
from dla_ref import step

from ._cases import TOL, backbone_args, counterexample, dla_inputs, relative_error


def materialized_error(case):
    """Relative error between the recurrent outputs and the materialized form of its trace."""
    run = dla_ref.dla(**case)
    o = dla_ref.materialized(case["q"], case["k"], case["v"], case["lam"], run.trace,
                             capacity=case["capacity"], slots=case["slots"],
                             **backbone_args(case))
    return relative_error(run.o, o)


@pytest.mark.parametrize("slots", dla_ref.SLOT_ORDERS)
@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
@settings(max_examples=40)
@given(data=st.data())
def test_recurrent_equals_materialized(backbone, slots, data):
    case = data.draw(dla_inputs(backbones=(backbone,)))
    assert materialized_error(dict(case, slots=slots)) <= TOL


real_transition, real_slot_weights = step.transition, step.slot_weights


def gdn_without_delta_rule(xp, S, k, alpha, beta, backbone):
    """A plausible slip: the gdn transition without its (I - beta k k^T) factor."""
    return real_transition(xp, S, k, alpha, beta, "mamba2" if backbone == "gdn" else backbone)


def slot_order_ignored(xp, lam, m, slots):
    """A plausible slip: lambda read oldest-first whatever the slot order."""
    return real_slot_weights(xp, lam, m, "oldest-first")


@pytest.mark.parametrize("name, wrong, inputs", [
    ("transition", gdn_without_delta_rule, dla_inputs(backbones=("gdn",))),
    ("slot_weights", slot_order_ignored, dla_inputs()),
])
def test_the_check_catches_a_wrong_recurrent_step(monkeypatch, name, wrong, inputs):
    monkeypatch.setattr(step, name, wrong)  # the recurrent form only: materialized keeps its own
    counterexample(inputs, lambda case: materialized_error(case) > TOL)
