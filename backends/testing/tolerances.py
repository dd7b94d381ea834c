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


class ScoreBound(NamedTuple):
    """The state's part of a score's budget: atol + rtol |I_t| + square I_t^2.

    The whole budget of a score adds the error bound of the score itself
    (``budgets``: dla_ref.step.score_error_bound for scalars of the state dtype, token
    by token). This part covers the state's own rounding over the case's tokens, which
    the candidate's S carries and the float64 replay does not:

    atol, rtol  a relative error of the state is an absolute one of a token-mode score
                and a relative one of a state-mode score;
    square      the score's condition number grows like I_t / ||A - S_open|| where the
                open state has vanished: an unnormalized score against a state erased
                to rounding error is about ||s_t|| / eps, and its relative error about
                (the state's rounding) / eps, itself proportional to I_t. Negligible for
                normalized scores (<= 2).
    """

    atol: float
    rtol: float
    square: float

    def of_scores(self, scores: np.ndarray) -> np.ndarray:
        """This part of the budget of each score I_t (any shape)."""
        return self.atol + self.rtol * np.abs(scores) + self.square * np.square(scores)

    def of_info(self, info: np.ndarray, n: np.ndarray) -> np.ndarray:
        """This part of the budget of each J, a sum of n scores: at most the sum of
        theirs, n atol + rtol |J| + square J^2."""
        return n * self.atol + self.rtol * np.abs(info) + self.square * np.square(info)


# Per state dtype (of S, info and the scores); square = 4 unit roundoffs.
SCORE_BOUNDS = {
    "float64": ScoreBound(atol=1e-12, rtol=1e-9, square=4 * 2.0**-53),
    "float32": ScoreBound(atol=1e-5, rtol=2e-4, square=4 * 2.0**-24),
    "float16": ScoreBound(atol=3e-2, rtol=3e-2, square=4 * 2.0**-11),
    "bfloat16": ScoreBound(atol=1e-1, rtol=1e-1, square=4 * 2.0**-8),
}


class Tolerance(NamedTuple):
    """How far a candidate may be from the float64 reference.

    rtol, atol  outputs o and states S may differ by atol + rtol * max|want| over the
                compared array (a per-element relative error is meaningless where a
                readout sums terms that cancel)
    score       the state's part of the budget of scores I_t and of info J (sums of
                scores), ``ScoreBound``; the whole budget (``budgets``) adds the error
                bound of the score; its largest over a case is the admissibility check's
                score_tol and density_tol and the margin beyond which a reference
                decision is clear (``decision_tolerance``)
    """

    rtol: float
    atol: float
    score: ScoreBound

    @property
    def decision(self) -> float:
        """The state's part of a score's budget at I_t = 1, for callers that scale it
        themselves; ``check_case`` uses the budgets of ``budgets`` instead."""
        return float(self.score.of_scores(1.0))


def row(rtol: float, atol: float, state_dtype: str) -> Tolerance:
    return Tolerance(rtol, atol, SCORE_BOUNDS[state_dtype])


# Keyed by (state dtype, input dtype): the values part follows the inputs' precision,
# the score part the state's.
TOLERANCES = {
    ("float64", "float64"): row(1e-9, 1e-12, "float64"),
    ("float64", "float32"): row(1e-6, 1e-9, "float64"),
    ("float64", "float16"): row(2e-3, 1e-6, "float64"),
    ("float64", "bfloat16"): row(1.6e-2, 1e-6, "float64"),
    ("float32", "float64"): row(1e-4, 1e-6, "float32"),
    ("float32", "float32"): row(1e-4, 1e-6, "float32"),
    ("float32", "float16"): row(2e-3, 1e-5, "float32"),
    ("float32", "bfloat16"): row(1.6e-2, 1e-5, "float32"),
    ("float16", "float16"): row(1e-2, 1e-3, "float16"),
    ("bfloat16", "bfloat16"): row(6e-2, 1e-2, "bfloat16"),
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
