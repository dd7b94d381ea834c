"""Cases: the inputs of one call of dla (``Case``), and how they are made.

A ``CaseSpec`` is a small, paste-able description (seed, shapes, options, the kind of
tokens, decay and keys); ``build_case`` makes its arrays, deterministically in the spec,
so that a reproducer is one line. ``NAMED_CASES`` are the regression cases at the known
bug sites, run on every backend and dtype by tests/test_differential.py and ``dla check``.
See docs/testing-your-kernel.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

import dla_ref

from .arrays import noncontiguous, to_native, widened, widened_record

if TYPE_CHECKING:
    from .backends import Candidate

TOKEN_INPUTS = ("q", "k", "v", "lam", "log_alpha", "beta")


@dataclass(frozen=True, eq=False)
class Case:
    """The inputs of one call of dla, as NumPy float64 arrays, and its options.

    q, k [B, T, H, Dk], v [B, T, H, Dv], lam [B, T, H, K], log_alpha / beta [B, T, H]
    or None; options: backbone, tau, capacity, score, normalize, slots; trace: a
    forced Trace or None; initial_cache: a Cache or None; noncontiguous: feed the
    candidate strided views; origin: a Python expression that rebuilds the case
    (empty for cases made from someone's arrays, which reproducers save to a file).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    lam: np.ndarray
    options: dict
    log_alpha: np.ndarray | None = None
    beta: np.ndarray | None = None
    trace: dla_ref.Trace | None = None
    initial_cache: dla_ref.Cache | None = None
    noncontiguous: bool = False
    origin: str = ""

    def arguments(self) -> dict:
        """Keyword arguments of ``dla_ref.dla`` for this case (NumPy arrays)."""
        args = {name: getattr(self, name) for name in TOKEN_INPUTS}
        return {**args, **self.options, "trace": self.trace,
                "initial_cache": self.initial_cache}

    def native(self, candidate: Candidate) -> dict:
        """The keyword arguments converted to the candidate's arrays.

        Token inputs take the candidate's dtype (strided views if ``noncontiguous``);
        the initial cache's S and info and the forced trace's scores take its state
        dtype (its input dtype when the state dtype is not declared).
        """
        def inputs(x):
            if x is None:
                return None
            y = to_native(x, candidate.namespace, candidate.device, candidate.dtype)
            return noncontiguous(y) if self.noncontiguous else y

        state = candidate.state_dtype or candidate.dtype
        args = {name: inputs(getattr(self, name)) for name in TOKEN_INPUTS}
        convert = lambda record: None if record is None else type(record)(*(  # noqa: E731
            to_native(x, candidate.namespace, candidate.device, state) for x in record))
        return {**args, **self.options, "trace": convert(self.trace),
                "initial_cache": convert(self.initial_cache)}

    def as_given_to(self, candidate: Candidate) -> Case:
        """The case with its values rounded as the candidate receives them.

        The reference then sees exactly the numbers the candidate was given, so that
        only the candidate's arithmetic, not the rounding of its inputs, is judged.
        A value that overflows the candidate's dtypes (say an unnormalized score sum in
        a float16 cache) makes the case not applicable: NotImplementedError.
        """
        args = self.native(candidate)
        given = replace(self, **{name: widened(args[name]) for name in TOKEN_INPUTS},
                        trace=widened_record(args["trace"]),
                        initial_cache=widened_record(args["initial_cache"]))
        for name, x in given.arrays().items():
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise NotImplementedError(f"{name} overflows {candidate.dtype} inputs / "
                                          f"{candidate.state_dtype or candidate.dtype} state")
        return given

    def arrays(self) -> dict:
        """Every array of the case by name (initial cache and trace fields prefixed)."""
        arrays = {name: getattr(self, name) for name in TOKEN_INPUTS}
        for prefix, record in (("trace", self.trace), ("initial_cache", self.initial_cache)):
            if record is not None:
                arrays.update({f"{prefix}.{f}": x for f, x in record._asdict().items()})
        return {name: x for name, x in arrays.items() if x is not None}

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, T, H)."""
        return tuple(self.q.shape[:3])

    def save(self, path: str) -> None:
        """Write the case to one .npz file (arrays, and the options as JSON)."""
        meta = dict(options=self.options, noncontiguous=self.noncontiguous)
        np.savez(path, meta=np.array(json.dumps(meta)), **self.arrays())


def load_case(path: str) -> Case:
    """Read a case written by ``Case.save``."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {name: data[name] for name in data.files if name != "meta"}
    record = lambda cls, prefix: (  # noqa: E731
        cls(*(arrays[f"{prefix}.{f}"] for f in cls._fields))
        if all(f"{prefix}.{f}" in arrays for f in cls._fields) else None)
    return Case(**{name: arrays.get(name) for name in TOKEN_INPUTS},
                options=meta["options"], noncontiguous=meta["noncontiguous"],
                trace=record(dla_ref.Trace, "trace"),
                initial_cache=record(dla_ref.Cache, "initial_cache"))


@dataclass(frozen=True)
class CaseSpec:
    """A small, paste-able description of a case; ``build_case`` makes the arrays.

    seed          NumPy generator seed for every value
    B, T, H       batch, tokens, heads;  Dk, Dv  key and value sizes
    capacity      K as an int, or "reached" (K = the most slots any stream opens when
                  nothing merges: the cache fills exactly) or "exceeded" (that minus
                  one, at least 2: one stream merges exactly once)
    backbone, score, normalize, slots   the options of ``dla_ref.dla``
    tau           a number (+-inf allowed), or "at-score": stream 0's score at the first
                  token whose boundary is a free decision (which no tau changes)
    decay         log alpha: "moderate" U(-2, 0), "none" exactly 0, "extreme" -20,
                  "mixed" a per-token choice among 0, -1e-8, -20 and U(-2, 0), "strong"
                  U(-12, -4) at every token (a state left alone leaves float32's range
                  within about ten tokens, float64's much later)
    beta          gdn's beta: "uniform" U(0, 1) with a tenth exactly 0, "near-one"
                  1 - 10^U(-8, -1) with a fifth exactly 1 (with Dk = 1 the transition
                  erases the open state to rounding error)
    zeros         the share of tokens whose contribution s_t is exactly 0 (beta_t = 0,
                  k_t = 0 or v_t = 0, at random), e.g. 0.3
    keys          "normal" N(0, 1) (unit rows for gdn, so that I - beta k k^T is a
                  contraction), "zero" (about a third of the keys are 0), "tiny" (1e-4)
    tokens        "random" (independent N(0, 1)), "segments" (piecewise stationary, see
                  ``piecewise_stationary``: boundaries where segments change), or
                  "repeated": each token repeats the previous one with probability
                  0.7 (exact score and density ties)
    split         > 0: the first ``split`` tokens run through the reference first and
                  the case starts from their cache (the case keeps T tokens)
    forced_trace  give a random trace that fits the cache, to be replayed
    noncontiguous feed strided views
    """

    seed: int = 0
    B: int = 1
    T: int = 8
    H: int = 1
    Dk: int = 4
    Dv: int = 4
    capacity: int | str = 4
    backbone: str = "linear"
    score: str = "token"
    normalize: bool = True
    slots: str = "oldest-first"
    tau: float | str = 0.6
    decay: str = "moderate"
    beta: str = "uniform"
    zeros: float = 0.0
    keys: str = "normal"
    tokens: str = "random"
    split: int = 0
    forced_trace: bool = False
    noncontiguous: bool = False

    def __repr__(self):
        changed = [f"{f}={v!r}" for f, v in asdict(self).items()
                   if v != getattr(CaseSpec, f)]
        return f"CaseSpec({', '.join(changed)})"


def build_case(spec: CaseSpec) -> Case:
    """The case a spec describes (deterministic in the spec).

    Order of construction, since later choices read earlier runs of the reference:
    values, then tau ("at-score"), then K ("reached"/"exceeded"), then the initial
    cache (the first ``split`` tokens), then the forced trace.
    """
    rng = np.random.default_rng(spec.seed)
    B, H, total = spec.B, spec.H, spec.split + spec.T
    tokens = draw_tokens(rng, spec, B, total, H)
    options = dict(backbone=spec.backbone, score=spec.score, normalize=spec.normalize,
                   slots=spec.slots, tau=spec.tau, capacity=spec.capacity)
    lam_of = lambda K: rng.random((B, total, H, K))  # noqa: E731
    if spec.tau == "at-score":
        options["tau"] = score_at_first_free_decision({**options, "capacity": 2}, tokens,
                                                      lam_of(2))
    if spec.capacity in ("reached", "exceeded"):
        options["capacity"] = capacity_filled(options, tokens, total, lam_of,
                                              spec.capacity == "exceeded")
    tokens["lam"] = lam_of(options["capacity"])
    suffix = {name: None if x is None else x[:, spec.split:] for name, x in tokens.items()}
    cache = None
    if spec.split:
        prefix = {name: None if x is None else x[:, :spec.split] for name, x in tokens.items()}
        cache = dla_ref.dla(**prefix, **options).cache
    trace = random_trace(rng, (B, spec.T, H), options["capacity"], cache) \
        if spec.forced_trace else None
    return Case(**suffix, options=options, trace=trace, initial_cache=cache,
                noncontiguous=spec.noncontiguous, origin=f"build_case({spec!r})")


def draw_tokens(rng, spec: CaseSpec, B, T, H) -> dict:
    """q, k, v [B, T, H, D] and log_alpha, beta [B, T, H] (None where unused), per spec.

    The draws are made in a fixed order, and a field at its default draws nothing, so
    that adding a field leaves the cases of existing specs (named, golden) unchanged.
    """
    q = rng.standard_normal((B, T, H, spec.Dk))
    k = rng.standard_normal((B, T, H, spec.Dk))
    v = rng.standard_normal((B, T, H, spec.Dv))
    if spec.tokens == "segments":
        q, k, v = (piecewise_stationary(rng, x) for x in (q, k, v))
    if spec.backbone == "gdn":
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    if spec.keys == "zero":
        k[rng.random((B, T, H)) < 1 / 3] = 0.0
    elif spec.keys == "tiny":
        k *= 1e-4
    log_alpha = None if spec.backbone == "linear" else draw_decay(rng, spec.decay, (B, T, H))
    beta = draw_beta(rng, spec.beta, (B, T, H)) if spec.backbone == "gdn" else None
    tokens = dict(q=q, k=k, v=v, log_alpha=log_alpha, beta=beta)
    if spec.tokens == "repeated":
        repeat_tokens(rng, tokens)
    if spec.zeros:
        zero_contributions(rng, tokens, spec.zeros)
    return tokens


def draw_decay(rng, decay: str, shape) -> np.ndarray:
    """log alpha [B, T, H] of a decay kind (see ``CaseSpec``)."""
    draw = {"moderate": lambda: -2 * rng.random(shape),
            "none": lambda: np.zeros(shape),
            "extreme": lambda: np.full(shape, -20.0),
            "mixed": lambda: rng.choice([0.0, -1e-8, -20.0, -2 * rng.random()], size=shape),
            "strong": lambda: -4 - 8 * rng.random(shape)}
    return draw[decay]()


def draw_beta(rng, kind: str, shape) -> np.ndarray:
    """beta [B, T, H] of a kind (see ``CaseSpec``).

    beta = 1 with a repeated unit key (or any unit key when Dk = 1) erases the open
    state down to rounding error, whose direction (the score) is noise: "near-one"
    aims there.
    """
    if kind == "near-one":
        beta = 1 - 10.0 ** rng.uniform(-8, -1, shape)
        beta[rng.random(shape) < 0.2] = 1.0
        return beta
    beta = rng.random(shape)  # in [0, 1), exact 0 included
    beta[rng.random(shape) < 0.1] = 0.0
    return beta


def repeat_tokens(rng, tokens: dict) -> None:
    """Each token repeats the previous one with probability 0.7, per stream (in place)."""
    B, T, H = tokens["q"].shape[:3]
    for t in range(1, T):
        again = rng.random((B, H)) < 0.7
        for x in tokens.values():
            if x is not None:
                x[:, t][again] = x[:, t - 1][again]


def zero_contributions(rng, tokens: dict, share: float) -> None:
    """Make a ``share`` of the tokens contribute exactly s_t = 0 (in place).

    Each chosen token gets beta_t = 0 (gdn), k_t = 0 or v_t = 0, picked at random among
    those its backbone has: the zero-contribution rule of docs/spec/information-score.md
    is tested on the inputs, each of which must trigger it.
    """
    B, T, H = tokens["q"].shape[:3]
    chosen = rng.random((B, T, H)) < share
    ways = ("k", "v") + (("beta",) if tokens["beta"] is not None else ())
    way = rng.integers(len(ways), size=(B, T, H))
    for number, name in enumerate(ways):
        tokens[name][chosen & (way == number)] = 0.0


def piecewise_stationary(rng, x, change=0.25, noise=0.3) -> np.ndarray:
    """Tokens near a per-segment prototype: x [B, T, H, D] -> the same shape.

    A new segment starts at each token with probability ``change`` (per stream); its
    prototype is that token of x, and every token of it is the prototype plus
    ``noise`` times its own draw. Scores are then low inside a segment and high at a
    change (random directions alone score about sqrt(2) against each other).
    """
    prototype = x[:, 0]
    out = np.empty_like(x)
    for t in range(x.shape[1]):
        new = rng.random((x.shape[0], x.shape[2])) < change  # [B, H]
        prototype = np.where(new[..., None], x[:, t], prototype)
        out[:, t] = prototype + noise * rng.standard_normal(prototype.shape)
    return out


def score_at_first_free_decision(options, tokens, lam) -> float:
    """Stream 0's score at its first token with a free boundary decision (t = 1).

    Token 0 opens slot 0 whatever tau is, so the score at t = 1 does not depend on
    tau: setting tau to it puts a score exactly at tau. With one token there is no
    such score and the case's own tau (0.6) is kept.
    """
    if tokens["q"].shape[1] < 2:
        return 0.6
    return float(dla_ref.dla(**tokens, lam=lam, **{**options, "tau": 0.6}).trace.scores[0, 1, 0])


def capacity_filled(options, tokens, T, lam_of, exceed) -> int:
    """The most slots any stream opens when nothing merges (K = T + 1), or one less.

    With K equal to it, the fullest stream fills its cache exactly at its last
    boundary; with one less (at least 2) it merges exactly once.
    """
    opened = dla_ref.dla(**tokens, lam=lam_of(T + 1), **{**options, "capacity": T + 1})
    most = int(np.max(np.sum(opened.trace.boundary, axis=1)))
    return max(2, most - 1) if exceed else max(1, most)


def random_trace(rng, shape, K, cache=None) -> dla_ref.Trace:
    """A random trace [B, T, H] that fits a capacity-K cache (from ``cache`` if given).

    Free boundaries are drawn with probability 1/2; a boundary at a full cache merges
    a uniformly drawn pair. Scores are zero (a replayed trace's scores are not read).
    """
    B, T, H = shape
    boundary = np.zeros(shape, dtype=bool)
    merged = np.full(shape, -1, dtype=np.int64)
    for b in range(B):
        for h in range(H):
            m = 0 if cache is None else int(cache.m[b, h])
            for t in range(T):
                opens = m == 0 or (K > 1 and rng.random() < 0.5)
                boundary[b, t, h] = opens
                if opens and m == K:
                    merged[b, t, h] = rng.integers(0, K - 1)
                m = min(K, m + opens)
    return dla_ref.Trace(np.zeros(shape), boundary, merged)


# --- named regression cases ---------------------------------------------------------------

NAMED_CASES = {
    "T=1": CaseSpec(T=1, B=2, H=2),
    "K=1 (single state)": CaseSpec(capacity=1, T=10, tau=0.0),
    "K=2": CaseSpec(capacity=2, T=12, tau=0.3, seed=1),
    "capacity reached exactly": CaseSpec(capacity="reached", T=12, B=2, tokens="segments",
                                         tau=1.0, seed=2),
    "capacity exceeded by one": CaseSpec(capacity="exceeded", T=12, B=2, tokens="segments",
                                         tau=1.0, seed=2),
    "K >= T": CaseSpec(capacity=12, T=10, tau=0.3, seed=3),
    "density ties (repeated tokens, tau = -inf)": CaseSpec(tokens="repeated", tau=-math.inf,
                                                         capacity=3, T=12, seed=4),
    "score exactly at tau = 0 (repeated tokens)": CaseSpec(tokens="repeated", tau=0.0,
                                                         capacity=3, T=12, seed=5),
    "score at tau (tau = a computed score)": CaseSpec(tau="at-score", T=12, seed=6),
    "forced trace": CaseSpec(forced_trace=True, capacity=3, T=16, B=2, H=2, seed=7),
    "initial cache (split sequence)": CaseSpec(split=7, capacity=3, T=9, tau=0.3, seed=8),
    "non-contiguous inputs": CaseSpec(noncontiguous=True, B=2, H=2, T=9, Dk=3, Dv=5, seed=9),
    "mamba2, extreme decay": CaseSpec(backbone="mamba2", decay="extreme", T=12, seed=10),
    "mamba2, no decay, newest-first": CaseSpec(backbone="mamba2", decay="none",
                                               slots="newest-first", T=12, seed=11),
    "gdn, mixed decay, state score": CaseSpec(backbone="gdn", decay="mixed", score="state",
                                              T=12, capacity=3, seed=12),
    "zero keys, no normalization": CaseSpec(keys="zero", normalize=False, T=12, seed=13),
    "tiny keys, gdn": CaseSpec(backbone="gdn", keys="tiny", T=12, seed=14),
    # Issue 13: beta = 0 at t = 1 (a zero contribution) once opened an empty slot, and the
    # next score against that empty state was ~2/eps, set by rounding noise.
    "zero contribution, then a score against an empty state (gdn, Dk = 1)": CaseSpec(
        seed=3322, T=16, H=2, Dk=1, Dv=4, capacity=4, backbone="gdn", tau=0.6),
    # Issue 15: state-mode scores of blocks of similar tokens are small, where the
    # three-scalar score cancels (float32 scalars lost half their digits).
    "state-mode scores of similar tokens (three-scalar cancellation)": CaseSpec(
        seed=143, T=24, H=2, Dk=1, Dv=1, capacity=4, score="state", tokens="segments"),
    # A repeated token after a boundary scores 0 by cancellation; torch-chunked forms
    # <S_open, s_t> as a difference of prefix sums over the earlier tokens, whose
    # rounding the direct-scalar bound missed (budgets.recurrent_scalar_bound).
    "repeated token after a boundary (Dk = Dv = 1, initial cache)": CaseSpec(
        Dk=1, Dv=1, tokens="repeated", split=4),
}
