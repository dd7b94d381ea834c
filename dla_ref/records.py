"""The records DLA passes around: options, the state cache, the trace, the result.

All records hold fixed-shape arrays, so that the same code runs under NumPy,
``array_api_strict`` and torch. Dimension names used throughout the project:

    B batch, T tokens, H heads, N = B*H streams, K capacity (slots),
    Dk key/query size, Dv value size.

The pages: docs/spec/trace.md (Trace, Result, Cache) and docs/spec/boundaries.md (Options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

BACKBONES = ("linear", "mamba2", "gdn")
SCORES = ("token", "state")
SLOT_ORDERS = ("oldest-first", "newest-first")


class Cache(NamedTuple):
    """The capacity-bounded state cache of every stream.

    S    [B, H, K, Dk, Dv]  slot states, chronological (slot 0 = oldest); unused slots 0
    n    [B, H, K] int      tokens summarised per slot (>= 1 if used, 0 if unused)
    info [B, H, K] float    sum of the information scores of those tokens (J_i)
    m    [B, H]    int      slots in use (0 ... K)
    """

    S: Any
    n: Any
    info: Any
    m: Any


class Trace(NamedTuple):
    """What a run decided, one entry per token (docs/spec/trace.md).

    scores   [B, T, H] float  I_t (0 for the token that opens an empty cache)
    boundary [B, T, H] bool   b_t: the token opened a new slot
    merged   [B, T, H] int    j: slots j and j+1 were merged before the append; -1 = none
    """

    scores: Any
    boundary: Any
    merged: Any


class Tokens(NamedTuple):
    """The inputs of a run laid out as streams, in the computing dtype.

    q     [N, T, Dk]   k [N, T, Dk]   v [N, T, Dv]   lam [N, T, K]
    alpha [N, T]  = exp(log_alpha) (mamba2, gdn), else None
    beta  [N, T]  (gdn), else None

    ``step`` receives one token of it: the same fields without the T axis.
    """

    q: Any
    k: Any
    v: Any
    lam: Any
    alpha: Any
    beta: Any


class Result(NamedTuple):
    """Outputs ``o`` [B, T, H, Dv], the final ``cache``, the ``trace`` and the ``backend``
    that produced them (a registry name; "reference" for dla_ref).

    Dtypes, one rule for every backend: o has the result dtype of the inputs (q, k, v,
    lam); cache.S, cache.info and trace.scores the computing (state) dtype.
    """

    o: Any
    cache: Cache
    trace: Trace
    backend: str = "reference"


class Partition(NamedTuple):
    """The final partition of each stream (``dla_ref.partition``).

    starts [B, H, K] int  first token of each block (slot) at the end, -1 if unused
    slot   [B, T, H] int  the block that holds each token of the run at the end
    """

    starts: Any
    slot: Any


@dataclass(frozen=True)
class Options:
    """Every scalar choice of a run, validated once (``validation.check_options``).

    The pages: docs/spec/boundaries.md, docs/spec/readout.md, docs/choices.md.

    capacity  K >= 1
    tau       boundary threshold; +inf never opens a slot, -inf always does
    backbone  "linear" | "mamba2" | "gdn"
    score     "token" (R(s_t) vs R(S_open)) | "state" (R(S_open + s_t) vs R(S_open))
    normalize R(X) = X / sqrt(mean(X^2) + eps) if True, the identity if False
    slots     "oldest-first" (lambda[i] reads slot i) | "newest-first" (lambda[i] reads slot m-1-i)
    eps       > 0, the epsilon of R and of the score's denominator
    """

    capacity: int = 30
    tau: float = 0.6
    backbone: str = "linear"
    score: str = "token"
    normalize: bool = True
    slots: str = "oldest-first"
    eps: float = 1e-6
