"""Differential testing of DLA implementations against the reference (docs/spec/trace.md).

What a kernel engineer uses to check an implementation of ``dla_ref.dla``:

    from dla_backends.testing import assert_matches_reference
    assert_matches_reference(my_dla, q, k, v, lam, capacity=4, tau=0.6)

and what the project's own suite (tests/test_differential.py, ``dla check``) is built
from, one module per idea:

- ``backends``: test backend names, derived from the registry ("reference",
  "reference/torch", "triton@cuda:float16"), and the ``Candidate`` each names;
- ``arrays``: NumPy float64 to a candidate's arrays and back, strided views;
- ``cases``: ``Case`` (the inputs of one call), ``CaseSpec`` and ``build_case``, the
  named regression cases;
- ``tolerances``: the one tolerance table and ``assert_close``, which prints the error,
  where, the share of the budget used and a reproducer;
- ``layers``: ``check_decide`` and ``check_apply`` (the two layers of docs/spec/trace.md),
  ``check_case`` and ``assert_matches_reference``;
- ``gradients``: ``check_grads`` and ``assert_grads_match_reference``, a backward pass
  against ``dla_ref.vjp`` under the reference's trace;
- ``strategies``: Hypothesis strategies aimed at the known bug sites and the seeded specs
  of ``dla check``;
- ``golden``: the golden vectors (imported on its own: ``dla_backends.testing.golden``).

Only numpy, array-api-compat and dla_ref are imported here; torch, cupy,
array_api_strict and hypothesis are imported when a function needs them.
See docs/testing-your-kernel.md.
"""

from __future__ import annotations

from .arrays import noncontiguous, to_native, to_numpy, widened, widened_record
from .backends import (BACKENDS, Candidate, availability, backend_devices, backend_dtypes,
                       candidate_for, cuda_available, get_backend,
                       interpret_triton_without_cuda, reference_candidate)
from .cases import NAMED_CASES, Case, CaseSpec, build_case, load_case, random_trace
from .layers import (Margins, assert_matches_reference, check_apply, check_case,
                     check_decide, check_layout, decision_margins, decision_tolerance,
                     run_candidate)
from .gradients import (GradientContext, assert_grads_match_reference, check_grads,
                        gradient_backends, why_no_gradients)
from .strategies import case_specs, cases, draw_spec, load_hypothesis_profile, seeded_specs
from .tolerances import (SCORE_BOUNDS, TOLERANCES, Context, ScoreBound, Tolerance, assert_close,
                         tolerance)

__all__ = [
    # backends
    "BACKENDS", "Candidate", "availability", "backend_devices", "backend_dtypes", "candidate_for",
    "cuda_available", "get_backend", "interpret_triton_without_cuda", "reference_candidate",
    # arrays
    "noncontiguous", "to_native", "to_numpy", "widened", "widened_record",
    # cases
    "NAMED_CASES", "Case", "CaseSpec", "build_case", "load_case", "random_trace",
    # tolerances
    "SCORE_BOUNDS", "TOLERANCES", "Context", "ScoreBound", "Tolerance", "assert_close",
    "tolerance",
    # layers
    "Margins", "assert_matches_reference", "check_apply", "check_case", "check_decide",
    "check_layout", "decision_margins", "decision_tolerance", "run_candidate",
    # strategies
    "case_specs", "cases", "draw_spec", "load_hypothesis_profile", "seeded_specs",
    # gradients
    "GradientContext", "assert_grads_match_reference", "check_grads", "gradient_backends",
    "why_no_gradients",
]
