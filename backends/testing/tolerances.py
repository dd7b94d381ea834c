"""How far a candidate may be from the float64 reference, and the assert that says how far it is.

``TOLERANCES`` is the one table, keyed by (state dtype, input dtype); ``assert_close``
compares a candidate's array with the reference's, checks its namespace and device, and
on failure prints the largest error, where it is, the share of the budget it used and a
reproducer (``Context``). See docs/testing-your-kernel.md.
"""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import numpy as np

from .. import describe
from .arrays import to_numpy
from .backends import Candidate
from .cases import Case


class Tolerance(NamedTuple):
    """How far a candidate may be from the float64 reference.

    values    (rtol, atol): outputs o and states S may differ by atol + rtol * max|want|
              over the compared array (a per-element relative error is meaningless
              where a readout sums terms that cancel)
    decision  absolute tolerance on scores I_t and pair densities: the admissibility
              check's score_tol and density_tol, the margin beyond which a reference
              decision is clear, and, times max(1, |I_t|), the budget of a score
    """

    rtol: float
    atol: float
    decision: float


# Keyed by (state dtype, input dtype). The decision tolerance is wide enough for the
# three-scalar score of SPEC §7 (dla_ref.step.information_score_from_scalars), whose
# absolute error near I = 0 is about sqrt(machine epsilon) of the state dtype.
TOLERANCES = {
    ("float64", "float64"): Tolerance(1e-9, 1e-12, 1e-6),
    ("float64", "float32"): Tolerance(1e-6, 1e-9, 1e-6),
    ("float64", "float16"): Tolerance(2e-3, 1e-6, 1e-6),
    ("float64", "bfloat16"): Tolerance(1.6e-2, 1e-6, 1e-6),
    ("float32", "float64"): Tolerance(1e-4, 1e-6, 1e-3),
    ("float32", "float32"): Tolerance(1e-4, 1e-6, 1e-3),
    ("float32", "float16"): Tolerance(2e-3, 1e-5, 1e-3),
    ("float32", "bfloat16"): Tolerance(1.6e-2, 1e-5, 1e-3),
    ("float16", "float16"): Tolerance(1e-2, 1e-3, 3e-2),
    ("bfloat16", "bfloat16"): Tolerance(6e-2, 1e-2, 1e-1),
}


def tolerance(state_dtype: str, input_dtype: str) -> Tolerance:
    """The row of ``TOLERANCES`` for a candidate (KeyError names the missing pair)."""
    try:
        return TOLERANCES[(state_dtype, input_dtype)]
    except KeyError:
        raise KeyError(f"no tolerance for state dtype {state_dtype} with {input_dtype} "
                       f"inputs; known: {sorted(TOLERANCES)}") from None



class Context(NamedTuple):
    """What a failure message needs: who, on which case, and how to reproduce it."""

    candidate: Candidate
    case: Case

    def reproducer(self) -> str:
        """A paste-ready Python snippet that reruns this check."""
        if self.case.origin:
            rebuild = self.case.origin
        else:
            path = os.path.join(tempfile.mkdtemp(prefix="dla-case-"), "case.npz")
            self.case.save(path)
            rebuild = f"load_case({path!r})"
        return ("import numpy as np\n"
                "from dla_backends.testing import *\n"
                + (f"{self.candidate.imports}\n" if self.candidate.imports else "")
                + f"case = {rebuild}\n"
                f"check_case({self.candidate.rebuild}, case)"
                "  # runs it and dla_ref.dla, raises with the details")

    def fail(self, message: str):
        raise AssertionError(f"{self.candidate.label}: {message}\n"
                             f"--- reproduce with ---\n{self.reproducer()}")


def assert_close(actual, expected: np.ndarray, budget, what: str, context: Context,
                 namespace: str | None = None, device: str | None = None) -> float:
    """|actual - expected| <= budget elementwise; returns the largest share of it used.

    actual: the candidate's array, which must live in ``namespace`` on ``device``
    (the candidate's, by default); expected: the reference's, a NumPy array; budget:
    a scalar or an array broadcasting against them (0 asks for equality, which is
    how integer and bool fields are compared). On failure the message gives the
    largest error, its index, the share of the budget it used and a reproducer.
    """
    namespace = namespace or context.candidate.namespace
    device = device or context.candidate.device
    got_ns, got_dev, _ = describe(actual)
    if (got_ns, got_dev) != (namespace, device):
        context.fail(f"{what} is a {got_ns} array on {got_dev}; expected {namespace} on {device}")
    if describe(expected)[0] != "numpy":
        raise TypeError(f"the expected side of {what} must be NumPy (the reference's)")
    got = to_numpy(actual)
    if got.shape != expected.shape:
        context.fail(f"{what} has shape {list(got.shape)}; expected {list(expected.shape)}")
    if expected.dtype == bool or np.issubdtype(expected.dtype, np.integer):
        error = np.not_equal(got, expected).astype(float)
    else:
        error = np.abs(got.astype(np.float64) - expected)
        error = np.where(np.isnan(error), np.inf, error)
    budget = np.broadcast_to(np.asarray(budget, dtype=float), error.shape)
    share = np.divide(error, budget, out=np.where(error > 0, np.inf, 0.0), where=budget > 0)
    if error.size == 0:
        return 0.0
    worst = np.unravel_index(np.argmax(share), share.shape)
    if share[worst] > 1:
        context.fail(f"{what} differs from the reference at index {list(map(int, worst))}: "
                     f"got {got[worst].item()!r}, want {expected[worst].item()!r}; max abs error "
                     f"{np.max(error):.3g}, {share[worst]:.3g} x the budget "
                     f"({budget[worst]:.3g} there); {int(np.sum(share > 1))} of "
                     f"{share.size} entries over")
    return float(share[worst])
