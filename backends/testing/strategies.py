"""Cases drawn at the known bug sites: Hypothesis strategies and a seeded generator.

``draw_spec`` says what is drawn; ``case_specs`` / ``cases`` draw it with Hypothesis
(imported only here, when called), ``seeded_specs`` with a seeded NumPy generator for
``dla check``; ``load_hypothesis_profile`` sets the suite's profiles. See
docs/testing-your-kernel.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

import dla_ref

from .cases import CaseSpec, build_case


def draw_spec(pick: Callable[[str, tuple], Any], backbone: str | None = None) -> CaseSpec:
    """A CaseSpec whose every field is chosen by ``pick(name, options)``.

    The options list the simplest first (Hypothesis shrinks towards it) and aim at
    the known bug sites: T = 1 and T not a multiple of a chunk (1..24, and 48), K = 1,
    2, >= T, reached exactly and exceeded by one, scores at tau (tau "at-score", 0),
    tau = +-inf, exact ties (repeated tokens), decay extremes and long strong decay,
    zero and tiny keys, odd head sizes (1..8, Dk = 1 twice as often), initial caches,
    forced traces and strided inputs; and what found issues 13 and 15 of the score:
    contributions that are exactly zero (beta = 0, k = 0 or v = 0 at random tokens),
    gdn with beta near 1 (with Dk = 1 it erases the open state), state-mode scores of
    long blocks of similar tokens ("segments"). Repeating an option weights it.
    ``backbone`` fixes the backbone instead of drawing it.
    """
    T = pick("T", tuple(range(1, 25)) + (48,))
    capacity = pick("capacity", (4, 1, 2, 3, 5, 8, T, T + 1, "reached", "exceeded"))
    backbone = backbone or pick("backbone", dla_ref.BACKBONES)
    return CaseSpec(
        seed=pick("seed", tuple(range(2**16))),
        B=pick("B", (1, 2)), T=T, H=pick("H", (1, 2)),
        Dk=pick("Dk", (1,) + tuple(range(1, 9))), Dv=pick("Dv", tuple(range(1, 9))),
        capacity=capacity,
        backbone=backbone,
        score=pick("score", dla_ref.SCORES),
        normalize=pick("normalize", (True, False)),
        slots=pick("slots", dla_ref.SLOT_ORDERS),
        tau=pick("tau", (0.6, 0.3, 1.0, 1.4, "at-score", 0.0, math.inf, -math.inf)),
        decay=pick("decay", ("moderate", "none", "extreme", "mixed", "strong")),
        beta=pick("beta", ("uniform", "near-one")) if backbone == "gdn" else "uniform",
        zeros=pick("zeros", (0.0, 0.0, 0.1, 0.3)),
        keys=pick("keys", ("normal", "zero", "tiny")),
        tokens=pick("tokens", ("random", "segments", "repeated")),
        split=pick("split", (0, 0, 1, 5)),
        forced_trace=pick("forced_trace", (False, False, False, True)),
        noncontiguous=pick("noncontiguous", (False, True)),
    )


# The suite's Hypothesis profiles: "ci" replays the same examples on every run, "dev"
# draws fresh ones, ten times as many.
PROFILES = {"ci": dict(derandomize=True, max_examples=20),
            "dev": dict(derandomize=False, max_examples=200)}


def load_hypothesis_profile() -> str:
    """Register ``PROFILES`` and load the one HYPOTHESIS_PROFILE names ("ci" if unset).

    Called by tests/conftest.py and proofs/conftest.py, so that either directory run
    alone behaves as both run together. Returns the profile's name.
    """
    from hypothesis import settings

    for name, options in PROFILES.items():
        settings.register_profile(name, deadline=None, print_blob=True, **options)
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    return name


def case_specs(backbone: str | None = None):
    """Hypothesis strategy of CaseSpec (see ``draw_spec``); hypothesis is imported here."""
    from hypothesis import strategies as st

    @st.composite
    def specs(draw):
        return draw_spec(lambda name, options: draw(st.sampled_from(options)), backbone)

    return specs()


def cases(backbone: str | None = None):
    """Hypothesis strategy of Case: ``case_specs(backbone).map(build_case)``."""
    return case_specs(backbone).map(build_case)


def seeded_specs(seed: int, count: int, backbone: str | None = None) -> list[CaseSpec]:
    """``count`` specs drawn like ``case_specs`` from a seeded NumPy generator."""
    rng = np.random.default_rng(seed)
    return [draw_spec(lambda name, options: options[int(rng.integers(len(options)))],
                      backbone) for _ in range(count)]
