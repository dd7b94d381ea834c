"""The differential suite: every backend against the reference, both layers of docs/spec/trace.md.

Written once against the ``backend`` fixture (tests/conftest.py, DLA_BACKENDS). Each
case runs the backend, then ``check_case`` checks its layout, its decisions (layer 1:
admissible, hence equal to the reference's away from ties, and the exact rule) and its values
(layer 2: the reference replaying the backend's trace agrees within the tolerance table).
A backend that raises NotImplementedError for an option combination is "not applicable"
there: a named case is skipped with its message, a Hypothesis example is rejected.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, note, reject, settings

import dla_ref
from dla_backends.testing import (NAMED_CASES, Candidate, CaseSpec, availability, build_case,
                                  case_specs, check_apply, check_case, check_decide,
                                  check_layout, decision_margins, decision_tolerance,
                                  get_backend, reference_candidate, run_candidate, to_numpy)


def check_or_skip(backend: Candidate, spec: CaseSpec) -> None:
    try:
        check_case(backend, build_case(spec))
    except NotImplementedError as exc:
        pytest.skip(f"{backend.label}: not applicable to {spec!r}: {exc}")


@pytest.mark.parametrize("name", NAMED_CASES)
def test_named_case(backend, name):
    """The regression cases at the known bug sites (T = 1, K = 1, ties, ...)."""
    check_or_skip(backend, NAMED_CASES[name])


@pytest.mark.parametrize("backbone", dla_ref.BACKBONES)
def test_drawn_cases(backend, backbone, examples):
    """Hypothesis-drawn cases of one backbone (shapes, options and edge values drawn).

    The backbone's default case runs first: a backend that does not support the
    backbone at all is skipped with its reason rather than rejecting every example.
    """
    check_or_skip(backend, CaseSpec(backbone=backbone))

    @settings(max_examples=examples)
    @given(spec=case_specs(backbone))
    def check(spec):
        try:
            check_case(backend, build_case(spec))
        except NotImplementedError as exc:
            note(f"not applicable: {exc}")
            reject()

    check()


@settings(max_examples=30)
@given(spec=case_specs())
def test_float32_reference_passes_and_agrees_away_from_ties(spec):
    """The reference computing in float32 (a correct float32 kernel):

    - passes the float32 row of the tolerance table on drawn cases, its decisions at
      ties included (the table is not too tight);
    - decides as the float64 reference does in every stream up to its first decision
      that is not clear (docs/spec/trace.md: "away from ties the traces are equal"), which
      check_decide leaves to admissibility, since admissibility implies it.
    """
    float32 = reference_candidate("float32")
    case = build_case(spec).as_given_to(float32)
    got = run_candidate(float32, case)
    check_layout(float32, case, got)
    check_decide(float32, case, got)
    check_apply(float32, case, got)
    if case.trace is None:
        want, margins = decision_margins(case)
        tol = decision_tolerance(float32, case, got)
        unclear = (margins.score <= tol) | (margins.density <= tol)
        settled = np.cumsum(unclear, axis=1) == 0  # [B, T, H]: before the first tie
        for name in ("boundary", "merged"):
            same = to_numpy(getattr(got.trace, name)) == getattr(want, name)
            assert same[settled].all(), name


def test_the_documented_examples_run():
    """docs/testing-your-kernel.md's Python blocks run as written: one call of
    assert_matches_reference, its Hypothesis test of a float32 stand-in kernel, and
    assert_grads_match_reference on a stand-in backward."""
    doc = Path(__file__).parents[1] / "docs" / "testing-your-kernel.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 3, "the page's examples changed: update this test"
    # a name that is no file: the joined blocks have line numbers of their own
    exec(compile("\n".join(blocks), f"<{doc.name}>", "exec"), {"__name__": "docs_example"})


@pytest.mark.parametrize("name", ["reference", "reference/torch"])
def test_noncontiguous_cases_feed_strided_views(name):
    """The named non-contiguous case does reach the backend as strided views, with the
    case's values (else its test would check nothing new)."""
    ok, why = availability(name)
    if not ok:
        pytest.skip(why)
    backend = get_backend(name)
    case = build_case(NAMED_CASES["non-contiguous inputs"])
    given = case.native(backend)
    for field in ("q", "k", "v", "lam"):
        x = given[field]
        contiguous = x.is_contiguous() if hasattr(x, "is_contiguous") else x.flags.c_contiguous
        assert not contiguous, field
        assert np.array_equal(to_numpy(x), getattr(case, field)), field
