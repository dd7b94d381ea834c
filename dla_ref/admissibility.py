"""Trace admissibility (SPEC §4): was each decision of another implementation right?

Decisions are discontinuous in the inputs, so a float32 kernel may legitimately
decide differently from the float64 reference when a score lies a hair from tau or
two densities a hair apart. Replaying the candidate's trace, the reference
recomputes every score and density and accepts a decision when it is right up to
a tolerance:

    b_t = 1 (with a free choice) needs I_t >= tau - score_tol
    b_t = 0                      needs I_t <  tau + score_tol
    merge j                      needs density_j - min_j' density_j' <= density_tol

A decision is free when the cache is non-empty and K >= 2 (otherwise the rules of
SPEC §3 force it, and a violation raises ValueError as for any forced trace).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .recurrent import prepare, replay, scan
from .validation import check_options


class Inadmissible(NamedTuple):
    """The first wrong decision: where, what, and by how much it misses (margin > 0)."""

    t: int
    b: int
    h: int
    kind: str  # "boundary" (should not have opened), "no-boundary", or "merge"
    margin: float
    score: float

    def __str__(self):
        return (f"inadmissible {self.kind} at t={self.t}, b={self.b}, h={self.h}: "
                f"misses by {self.margin:.3g} (score {self.score:.6g})")


def check_trace(q, k, v, lam, trace, *, backbone="linear", log_alpha=None, beta=None,
                tau=0.6, capacity=30, score="token", normalize=True, slots="oldest-first",
                eps=1e-6, initial_cache=None, score_tol=1e-6, density_tol=1e-6):
    """The first inadmissible decision of ``trace`` (ordered by t, then b, h), or None.

    Arguments as in ``dla_ref.dla``; ``trace`` is the candidate's Trace (its scores
    are not read). Both tolerances are absolute (I_t and densities are O(1)); pick
    them for the candidate's dtype (``dla_backends.testing`` has a table).
    """
    opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                         normalize=normalize, slots=slots, eps=eps)
    xp, (B, T, H), tokens, cache = prepare(q, k, v, lam, log_alpha, beta, opts,
                                           initial_cache, None)
    replayed = replay(xp, trace, B, T, H, opts)
    free = []  # per t: was the boundary decision free (m > 0 and K >= 2)?

    def decide_at(t):
        def decide(score_, m, n, info):
            free.append((m > 0) if capacity > 1 else (m < 0))
            return replayed(t)(score_, m, n, info)
        return decide

    _, _, (scores, boundary, merged), margin = scan(xp, tokens, cache, opts, decide_at)
    free = xp.stack(free, axis=1)
    zero = xp.zeros_like(scores)
    misses = {
        "boundary": xp.where(free & boundary, (tau - score_tol) - scores, zero - 1),
        "no-boundary": xp.where(free & ~boundary, scores - (tau + score_tol), zero - 1),
    }
    misses["merge"] = xp.where(merged >= 0, margin - density_tol, zero - 1)
    return first_miss(misses, scores, H, strict={"no-boundary"})


def first_miss(misses, scores, H, strict):
    """The earliest (t, stream) where a miss is > 0 (>= 0 for the kinds in ``strict``).

    misses: kind -> [N, T] array; returns an Inadmissible or None.
    """
    best = None
    for kind, miss in misses.items():
        miss = to_host(miss)
        bad = miss >= 0 if kind in strict else miss > 0
        if bad.any():
            t, n = (int(i) for i in np.argwhere(bad.T)[0])  # ordered by t, then stream
            if best is None or (t, n) < best[:2]:
                best = (t, n, kind, float(miss[n, t]))
    if best is None:
        return None
    t, n, kind, margin = best
    return Inadmissible(t, n // H, n % H, kind, margin, float(to_host(scores)[n, t]))


def to_host(x):
    """A NumPy copy of an array of any namespace (for reporting only)."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError):  # array_api_strict has no __array__
        return np.from_dlpack(x)
