"""What the proofs share: Hypothesis strategies for inputs of ``dla_ref.dla``, a
tolerance, and ``counterexample``, which shows that a check has teeth.

Values come from a seeded NumPy generator (generic, like real activations), while
Hypothesis draws everything that selects a code path: backbone, shapes, capacity,
tau, score mode, slot order, the scale of keys and the strength of the decay.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st

import dla_ref


@st.composite
def dla_inputs(draw, backbones=dla_ref.BACKBONES, max_T=8, max_capacity=4):
    """Keyword arguments of ``dla_ref.dla`` for one small random case.

    q, k [B, T, H, Dk], v [B, T, H, Dv], lam [B, T, H, K] in [0, 1), log_alpha [B, T, H]
    in (-decay, 0] (mamba2, gdn), beta [B, T, H] in [0, 1) (gdn); tau in [0, 2], which
    spans the normalized score's range, so that boundaries, absorptions and merges
    all occur (tau = 0 opens a slot at every token, 0.6 is the paper's default);
    T is often just past K, so that the cache fills and overflows.
    """
    backbone = draw(st.sampled_from(backbones))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    K = draw(st.integers(1, max_capacity))
    # T just past the capacity (one merge, then two) and the longest T, or any T
    T = draw(st.sampled_from([K + 1, K + 2, max_T]) | st.integers(1, max_T))
    Dk, Dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    key_scale = draw(st.sampled_from([1e-2, 1.0, 1 / np.sqrt(Dk)]))
    case = dict(
        q=rng.standard_normal((B, T, H, Dk)),
        k=key_scale * rng.standard_normal((B, T, H, Dk)),
        v=rng.standard_normal((B, T, H, Dv)),
        lam=rng.random((B, T, H, K)),
        backbone=backbone,
        capacity=K,
        tau=draw(st.sampled_from([0.0, 0.6]) | st.floats(0.0, 2.0)),
        score=draw(st.sampled_from(dla_ref.SCORES)),
        normalize=draw(st.booleans()),
        slots=draw(st.sampled_from(dla_ref.SLOT_ORDERS)),
    )
    if backbone != "linear":
        decay = draw(st.sampled_from([1e-3, 1.0, 20.0]))  # alpha ~ 1, moderate, ~ 0
        case["log_alpha"] = -decay * rng.random((B, T, H))
    if backbone == "gdn":  # keys of norm <= 1, as gdn assumes (docs/spec/backbones.md)
        norm = np.linalg.norm(case["k"], axis=-1, keepdims=True)
        case["k"] = case["k"] / np.maximum(norm, 1.0)
        case["beta"] = rng.random((B, T, H))
    return case


def prefix(case, t):
    """The same case cut to its first t tokens (every per-token array along axis 1)."""
    per_token = ("q", "k", "v", "lam", "log_alpha", "beta")
    return {name: (x[:, :t] if name in per_token else x) for name, x in case.items()}


def backbone_args(case):
    """The arguments that define the backbone (what ``single`` and ``materialized`` take)."""
    return {name: case[name] for name in ("backbone", "log_alpha", "beta") if name in case}


def relative_error(actual, expected):
    """max |actual - expected| / max(1, max |expected|): one number per comparison."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


# float64 identities hold to rounding; 1e-9 leaves room for T <= 8 steps of growth.
TOL = 1e-9


def counterexample(strategy, violates, max_examples=300):
    """An example for which ``violates`` is true, found by Hypothesis (else the test fails).

    Used with a deliberately wrong variant of a statement or of the code, to show that
    the property check of a proof would catch it: a check that never fails proves
    nothing. Derandomized, so the search is reproducible; not shrunk, since only its
    existence matters.
    """
    search = settings(max_examples=max_examples, derandomize=True, database=None,
                      deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
    return find(strategy, violates, settings=search)
