"""Trace admissibility: was each decision of another implementation right?

Decisions are discontinuous in the inputs, so a float32 kernel may legitimately
decide differently from the float64 reference when a score lies a hair from tau or
two densities a hair apart. Replaying the candidate's trace, the reference
recomputes every score and density and accepts a decision when it is right up to
a tolerance:

    b_t = 1 (with a free choice) needs I_t >= tau - score_tol
    b_t = 0                      needs I_t <  tau + score_tol
    merge j                      needs density_j - min_j' density_j' <= density_tol
    b_t = 1 on a zero contribution (m > 0) misses by inf: DLA absorbs it whatever tau

A decision is free when the cache is non-empty and K >= 2 (otherwise the rules
force it, and a violation raises ValueError as for any forced trace). The page:
docs/spec/trace.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._xp import device, to_host, to_namespace
from .recurrent import prepare, replay, scan
from .step import decision_is_free, pair_density
from .validation import check_options, check_real


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
    are not read), of any namespace: it is converted to the inputs'. Both tolerances
    are absolute (I_t and densities are O(1)); pick them for the candidate's dtype
    (``dla_backends.testing`` has a table).
    """
    opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                         normalize=normalize, slots=slots, eps=eps)
    xp, (B, T, H), tokens, cache = prepare(q, k, v, lam, log_alpha, beta, opts,
                                           initial_cache, None)
    score_tol, density_tol = check_real("score_tol", score_tol), check_real("density_tol",
                                                                         density_tol)
    replayed = replay(xp, to_namespace(xp, device(q), trace), B, T, H, opts)
    free, margins = [], []  # per t: was b_t free; how much denser the merged pair was
    absorbs = []  # per t: must b_t be 0 (a zero contribution, m > 0)

    def decide_at(t):
        def decide(score_, m, n, info, silent):
            boundary, merged = replayed(t)(score_, m, n, info, silent)
            free.append(decision_is_free(m, opts.capacity) & ~silent)
            absorbs.append((m > 0) & silent)
            margins.append(density_margin(xp, n, info, merged))
            return boundary, merged
        return decide

    _, _, (scores, boundary, merged) = scan(xp, tokens, cache, opts, decide_at)
    free, margin = xp.stack(free, axis=1), xp.stack(margins, axis=1)
    absorbs = xp.stack(absorbs, axis=1)
    zero = xp.zeros_like(scores)
    never = xp.where(absorbs & boundary, zero + float("inf"), zero - 1)
    misses = {
        "boundary": xp.where(free & boundary, (opts.tau - score_tol) - scores, never),
        "no-boundary": xp.where(free & ~boundary, scores - (opts.tau + score_tol), zero - 1),
    }
    misses["merge"] = xp.where(merged >= 0, margin - density_tol, zero - 1)
    return first_miss(misses, scores, H, strict={"no-boundary"})


def density_margin(xp, n, info, merged):
    """How much denser the merged pair is than the least dense one (>= 0), [N].

    n, info [N, K] before the merge, merged [N] (-1: none). 0 where no merge happened;
    a forced merge of a pair touching an unused slot has density inf and stays visible.
    """
    zero = xp.zeros(merged.shape, dtype=info.dtype, device=device(info))
    if n.shape[1] < 2:  # no pairs, so no merge (K = 1)
        return zero
    density = pair_density(xp, n, info)
    pair = xp.arange(density.shape[1], dtype=merged.dtype, device=device(merged))
    chosen_mask = pair[None, :] == merged[:, None]
    chosen = xp.sum(xp.where(chosen_mask, density, xp.zeros_like(density)), axis=1)
    return xp.where(merged >= 0, chosen - xp.min(density, axis=1), zero)


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

