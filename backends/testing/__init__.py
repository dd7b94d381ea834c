"""Differential testing of DLA implementations against the reference (SPEC §4).

What a kernel engineer uses to check an implementation of ``dla_ref.dla``:

    from dla_backends.testing import assert_matches_reference
    assert_matches_reference(my_dla, q, k, v, lam, capacity=4, tau=0.6)

and what the project's own suite (tests/test_differential.py, ``dla check``) is built
from:

- the backend table: a test name ("numpy", "torch@cuda", ...) -> a ``Candidate``, the
  implementation with the array namespace, device and dtypes it is fed;
- ``Case``: the inputs of one call as NumPy float64 arrays plus options, converted to
  a candidate's arrays by ``Case.native`` and built from a small, paste-able
  ``CaseSpec`` by ``build_case``;
- ONE tolerance table, keyed by (state dtype, input dtype), with the float64
  reference as the expected side, and ``assert_close``, which checks namespaces and
  prints the error, where, the share of the budget used and a reproducer;
- the two layers of SPEC §4: ``check_decide`` (the trace fits, is admissible, which
  makes it equal to the reference's away from ties, and obeys the exact rule) and
  ``check_apply`` (under the candidate's own trace the reference gives the same
  outputs, cache and scores); ``check_case`` runs the candidate and both;
- Hypothesis strategies aimed at the known bug sites (``case_specs``, ``cases``) and
  a seeded generator of the same specs for ``dla check`` (``seeded_specs``).

Only numpy, array-api-compat and dla_ref are imported here; torch, cupy,
array_api_strict and hypothesis are imported when a function needs them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple
from collections.abc import Callable

import numpy as np

import dla_ref
from dla_ref.admissibility import to_host
from dla_ref.recurrent import prepare, scan
from dla_ref.step import dla_decision, pair_density
from dla_ref.validation import check_options

from .. import describe, registry

# --- the backend table ------------------------------------------------------------


class TableEntry(NamedTuple):
    """A test backend: which registry implementation runs, on which arrays.

    implementation  the registry name ("reference", "numba", "torch", ...)
    namespace       the arrays it is fed ("numpy", "array_api_strict", "torch", "cupy")
    devices         the devices a "@device" suffix may pick; the first is the default
    """

    implementation: str
    namespace: str
    devices: tuple[str, ...]


BACKENDS = {
    "numpy": TableEntry("reference", "numpy", ("cpu",)),
    "array_api_strict": TableEntry("reference", "array_api_strict", ("cpu",)),
    "reference-torch": TableEntry("reference", "torch", ("cpu", "cuda")),
    "numba": TableEntry("numba", "numpy", ("cpu",)),
    "torch": TableEntry("torch", "torch", ("cpu", "cuda")),
    "torch-chunked": TableEntry("torch-chunked", "torch", ("cpu", "cuda")),
    "triton": TableEntry("triton", "torch", ("cpu", "cuda")),
    "cupy": TableEntry("cupy", "cupy", ("cuda",)),
    "cuda-model": TableEntry("cuda-model", "numpy", ("cpu",)),
}


@dataclass(frozen=True)
class Candidate:
    """An implementation under test and the arrays it is fed.

    label        how reports name it ("torch@cuda", "mymodule:my_dla")
    load         () -> the callable, with the signature and result of ``dla_ref.dla``
    namespace    array namespace of its inputs and outputs, as ``describe`` names it
    device       "cpu" or "cuda"
    dtype        the floating dtype of the inputs it is given ("float64", "float32", ...)
    state_dtype  the dtype of its cache S, info and trace scores; None = not declared
                 (then it is read from the result and not checked)
    rebuild      a Python expression that rebuilds this candidate in a reproducer
    imports      the line(s) that expression needs first ("" if none)
    """

    label: str
    load: Callable[[], Callable]
    namespace: str
    device: str
    dtype: str
    state_dtype: str | None
    rebuild: str
    imports: str = ""


class BackendName(NamedTuple):
    """A parsed test backend name NAME[@DEVICE][:DTYPE], e.g. "triton@cuda:float16"."""

    base: str
    entry: TableEntry
    device: str
    dtype: str | None  # None: float64 if the implementation takes it, else float32


def parse_backend(name: str) -> BackendName:
    """Parse NAME[@DEVICE][:DTYPE]: a BACKENDS name, a device, an input dtype.

    No device picks the entry's first; no dtype lets ``get_backend`` choose. An
    unknown name, a device the entry cannot run on or a dtype its implementation does
    not take is a ValueError that lists what is known.
    """
    rest, _, dtype = name.partition(":")
    base, _, device = rest.partition("@")
    if base not in BACKENDS:
        raise ValueError(f"unknown test backend {name!r}; known: {', '.join(BACKENDS)} "
                         "(written NAME[@DEVICE][:DTYPE], e.g. triton@cuda:float16)")
    entry = BACKENDS[base]
    device = device or entry.devices[0]
    if device not in entry.devices:
        raise ValueError(f"test backend {base!r} runs on {'/'.join(entry.devices)}, "
                         f"not {device!r} (in {name!r})")
    accepted = registry.get(entry.implementation).dtypes
    if dtype and dtype not in accepted:
        raise ValueError(f"test backend {base!r} takes {'/'.join(accepted)}, not {dtype!r} "
                         f"(in {name!r})")
    return BackendName(base, entry, device, dtype or None)


def get_backend(name: str) -> Candidate:
    """The candidate for a test backend name ("numpy", "triton@cuda:float16", ...).

    Its inputs are of the named dtype, else float64 where the implementation accepts
    float64, else float32; its state dtype is the registry's (``state_dtype_for``).
    """
    base, entry, device, dtype = parse_backend(name)
    impl = registry.get(entry.implementation)
    dtype = dtype or ("float64" if "float64" in impl.dtypes else "float32")
    return Candidate(label=f"{base}@{device}:{dtype}", load=impl.load,
                     namespace=entry.namespace, device=device, dtype=dtype,
                     state_dtype=impl.state_dtype_for(dtype),
                     rebuild=f"get_backend({name!r})")


def availability(name: str) -> tuple[bool, str]:
    """(True, "") if test backend ``name`` can run here, else (False, why).

    Checks, in order: the array package of its namespace, the device, the registry's
    availability test, and that the implementation's module exists (it may not be
    written yet). An unknown name is a ValueError, not an unavailability.
    """
    _, entry, device, _ = parse_backend(name)
    package = {"numpy": "numpy", "array_api_strict": "array_api_strict",
               "torch": "torch", "cupy": "cupy"}[entry.namespace]
    if importlib.util.find_spec(package) is None:
        return False, f"not installed: {package}"
    if device == "cuda" and not cuda_available(entry.namespace):
        return False, "no CUDA device"
    impl = registry.get(entry.implementation)
    ok, why = impl.available()
    if not ok:
        return False, why
    module = impl.loader.partition(":")[0]
    if importlib.util.find_spec(module) is None:
        return False, f"module {module} does not exist (not written yet?)"
    return True, ""


def interpret_triton_without_cuda() -> None:
    """Set TRITON_INTERPRET=1 (unless it is set) when torch sees no CUDA device.

    Then the Triton kernels run on CPU tensors. Triton reads the variable when it is
    first imported, so this must run before anything imports triton.
    """
    if importlib.util.find_spec("torch") is None or not cuda_available("torch"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cuda_available(namespace: str) -> bool:
    """Whether the array package of ``namespace`` sees a CUDA device."""
    if namespace == "torch":
        import torch

        return torch.cuda.is_available()
    if namespace == "cupy":
        ok, _ = registry.get("cupy").available()
        return ok
    return False


def reference_candidate(dtype: str) -> Candidate:
    """The reference computing in ``dtype`` (its inputs and state in that dtype).

    What a correct kernel of that precision looks like: the suite runs it against
    the float64 reference to show that the tolerance table is not too tight.
    """
    def dla(*args, **kwargs):
        return dla_ref.dla(*args, **kwargs, dtype=np.dtype(dtype))

    return Candidate(label=f"dla_ref.dla(dtype={dtype})", load=lambda: dla,
                     namespace="numpy", device="cpu", dtype=dtype, state_dtype=dtype,
                     rebuild=f"reference_candidate({dtype!r})")


def candidate_for(fn: Callable, q, state_dtype: str | None = None) -> Candidate:
    """A candidate for any callable with the dla signature, fed arrays like ``q``."""
    namespace, device, dtype = describe(q)
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "your_dla")
    importable = module is not None and "<" not in qualname
    return Candidate(label=f"{module}:{qualname}", load=lambda: fn, namespace=namespace,
                     device=device, dtype=dtype, state_dtype=state_dtype,
                     rebuild=(f"candidate_for({qualname if importable else 'your_dla'}, "
                              f"to_native(case.q, {namespace!r}, {device!r}, {dtype!r}), "
                              f"state_dtype={state_dtype!r})"),
                     imports=(f"from {module} import {qualname}" if importable else
                              f"your_dla = ...  # the function under test, {qualname}"))


# --- converting arrays ----------------------------------------------------------------


def to_native(x: np.ndarray, namespace: str, device: str, dtype: str | None = None):
    """A NumPy array as an array of ``namespace`` on ``device``.

    Floating arrays are cast to ``dtype`` (a name such as "float32"); integer and
    bool arrays keep their dtype.
    """
    if dtype is None or not np.issubdtype(x.dtype, np.floating):
        dtype = x.dtype.name
    if namespace == "numpy":
        with np.errstate(over="ignore"):  # Case.as_given_to reports values that overflow
            return np.array(x, dtype=dtype)
    if namespace == "array_api_strict":
        import array_api_strict as xps

        return xps.asarray(np.ascontiguousarray(x), dtype=getattr(xps, dtype))
    if namespace == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device,
                                                             dtype=getattr(torch, dtype))
    if namespace == "cupy":
        import cupy

        return cupy.asarray(x, dtype=dtype)
    raise ValueError(f"no conversion to namespace {namespace!r}")


def to_numpy(x) -> np.ndarray:
    """Any namespace's array as a NumPy array (bfloat16 widened to float32)."""
    if describe(x)[0] == "cupy":
        import cupy

        return cupy.asnumpy(x)
    if hasattr(x, "detach") and str(x.dtype) == "torch.bfloat16":
        x = x.float()
    return np.asarray(to_host(x))


def widened(x) -> np.ndarray | None:
    """Any namespace's array as NumPy, floating dtypes widened to float64 (None stays None)."""
    if x is None:
        return None
    x = to_numpy(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x


def widened_record(record):
    """``widened`` applied to every field of a Trace or Cache (None stays None)."""
    return None if record is None else type(record)(*(widened(x) for x in record))


def noncontiguous(x):
    """The same values as a strided, transposed view (NumPy, CuPy and torch).

    The values are laid out with every axis reversed and every element doubled
    along the last axis, then viewed back in the original order and every other
    element taken: no axis has the natural stride. array_api_strict has no strides,
    so its arrays come back as they are.
    """
    namespace = describe(x)[0]
    if namespace in ("numpy", "cupy"):
        xp = np if namespace == "numpy" else importlib.import_module("cupy")
        return xp.ascontiguousarray(xp.repeat(x, 2, axis=-1).T).T[..., ::2]
    if namespace == "torch":
        axes = tuple(range(x.ndim))[::-1]
        doubled = x.repeat_interleave(2, dim=-1)
        return doubled.permute(axes).contiguous().permute(axes)[..., ::2]
    return x


# --- cases ------------------------------------------------------------------------------

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
                  "mixed" a per-token choice among 0, -1e-8, -20 and U(-2, 0)
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
    """q, k, v [B, T, H, D] and log_alpha, beta [B, T, H] (None where unused), per spec."""
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
    log_alpha = beta = None
    if spec.backbone != "linear":
        log_alpha = {"moderate": lambda: -2 * rng.random((B, T, H)),
                     "none": lambda: np.zeros((B, T, H)),
                     "extreme": lambda: np.full((B, T, H), -20.0),
                     "mixed": lambda: rng.choice([0.0, -1e-8, -20.0, -2 * rng.random()],
                                                 size=(B, T, H))}[spec.decay]()
    if spec.backbone == "gdn":
        # beta in [0, 1), exact 0 included. beta = 1 with a repeated unit key erases the
        # open state down to rounding error, whose direction (the score) is noise.
        beta = rng.random((B, T, H))
        beta[rng.random((B, T, H)) < 0.1] = 0.0
    if spec.tokens == "repeated":
        for t in range(1, T):
            again = rng.random((B, H)) < 0.7
            for x in (q, k, v, log_alpha, beta):
                if x is not None:
                    x[:, t][again] = x[:, t - 1][again]
    return dict(q=q, k=k, v=v, log_alpha=log_alpha, beta=beta)


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


# --- tolerances ---------------------------------------------------------------------------


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


# --- the assert helper --------------------------------------------------------------------


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


# --- running a candidate -----------------------------------------------------------------


def run_candidate(candidate: Candidate, case: Case) -> dla_ref.Result:
    """The candidate's Result on the case's inputs, converted to its arrays.

    NotImplementedError (the candidate declares the option combination unsupported)
    propagates: the caller reports it as not applicable. Any other exception is a
    failure (the case is valid input), reported with a reproducer.
    """
    try:
        result = candidate.load()(**case.native(candidate))
    except NotImplementedError:
        raise
    except Exception as exc:
        Context(candidate, case).fail(f"raised {type(exc).__name__}: {exc}")
    if not (isinstance(result, dla_ref.Result) and isinstance(result.cache, dla_ref.Cache)
            and isinstance(result.trace, dla_ref.Trace)):
        Context(candidate, case).fail(
            f"returned {type(result).__name__}; expected dla_ref.Result(o, Cache, Trace)")
    return result


def check_layout(candidate: Candidate, case: Case, got: dla_ref.Result) -> None:
    """Shapes, dtypes, namespace and device of every returned array (the contract).

    o [B, T, H, Dv] in the input dtype; S [B, H, K, Dk, Dv], info [B, H, K] and
    trace scores [B, T, H] in the state dtype; n [B, H, K] and m [B, H] int64;
    boundary [B, T, H] bool; merged [B, T, H] int64; all in the candidate's
    namespace and on its device.
    """
    context = Context(candidate, case)
    B, T, H = case.shape
    K, Dk, Dv = case.options["capacity"], case.q.shape[3], case.v.shape[3]
    state = candidate.state_dtype or describe(got.cache.S)[2]
    want = {
        "o": ((B, T, H, Dv), candidate.dtype), "cache.S": ((B, H, K, Dk, Dv), state),
        "cache.n": ((B, H, K), "int64"), "cache.info": ((B, H, K), state),
        "cache.m": ((B, H), "int64"), "trace.scores": ((B, T, H), state),
        "trace.boundary": ((B, T, H), "bool"), "trace.merged": ((B, T, H), "int64"),
    }
    for name, (shape, dtype) in want.items():
        x = got.o if name == "o" else getattr(getattr(got, name.split(".")[0]),
                                              name.split(".")[1])
        namespace, device, got_dtype = describe(x)
        if (namespace, device) != (candidate.namespace, candidate.device):
            context.fail(f"{name} is a {namespace} array on {device}; expected "
                         f"{candidate.namespace} on {candidate.device}")
        if tuple(x.shape) != shape or got_dtype != dtype:
            context.fail(f"{name} is {got_dtype} {list(x.shape)}; expected {dtype} {list(shape)}")


def trace_to_numpy(trace: dla_ref.Trace) -> dla_ref.Trace:
    return dla_ref.Trace(*(to_numpy(x) for x in trace))


# --- layer 1: decide -------------------------------------------------------------------------


class Margins(NamedTuple):
    """How clear each of the reference's own decisions was, [B, T, H] each.

    score    |I_t - tau| where the boundary was a free decision (m > 0, K >= 2), else inf
    density  second-smallest minus smallest pair density where a merge happened, else inf
    """

    score: np.ndarray
    density: np.ndarray


def decision_margins(case: Case) -> tuple[dla_ref.Trace, Margins]:
    """The reference's own trace on the case, and how clear each decision was.

    It replays the reference's scan (dla_ref internals) with DLA's decision rule,
    recording the distance of each free score from tau and the gap between the two
    least dense pairs at each merge.
    """
    opts = check_options(eps=1e-6, **case.options)
    args = case.arguments()
    xp, (B, T, H), tokens, cache = prepare(
        args["q"], args["k"], args["v"], args["lam"], args["log_alpha"], args["beta"],
        opts, args["initial_cache"], None)
    own = dla_decision(xp, opts)
    score_gaps, density_gaps = [], []

    def decide_at(t):
        def decide(score, m, n, info):
            boundary, merged = own(score, m, n, info)
            free = (m > 0) & (opts.capacity > 1)
            score_gaps.append(np.where(free, np.abs(score - opts.tau), np.inf))
            density_gaps.append(np.where(merged >= 0, second_gap(pair_density(xp, n, info)),
                                         np.inf))
            return boundary, merged
        return decide

    _, _, (scores, boundary, merged), _ = scan(xp, tokens, cache, opts, decide_at)
    layout = lambda x: np.transpose(np.reshape(x, (B, H, T)), (0, 2, 1))  # noqa: E731
    trace = dla_ref.Trace(layout(scores), layout(boundary), layout(merged))
    gaps = (layout(np.stack(g, axis=1)) for g in (score_gaps, density_gaps))
    return trace, Margins(*gaps)


def second_gap(density: np.ndarray) -> np.ndarray:
    """Second-smallest minus smallest entry per row ([N, P] -> [N]; inf if P < 2)."""
    if density.shape[1] < 2:
        return np.full(density.shape[0], np.inf)
    two = np.sort(density, axis=1)[:, :2]
    with np.errstate(invalid="ignore"):  # inf - inf in caches not full, where no merge reads it
        return two[:, 1] - two[:, 0]


def check_decide(candidate: Candidate, case: Case, got: dla_ref.Result) -> None:
    """Layer 1 of SPEC §4: the candidate's decisions (``case`` as given to it).

    - A forced trace: the returned boundary and merged equal it.
    - Otherwise: the trace fits the cache and is admissible (``dla_ref.check_trace``),
      and the rule no rounding can change holds: with tau <= 0 and K >= 2 every token
      opens a slot (every I_t >= 0 and the rule is I_t >= tau; a tolerance would let
      a '>' slip through).

    Admissibility implies SPEC §4's "away from ties the traces are equal": up to the
    first decision where the two differ, the replay runs through the reference's own
    states, so there the candidate's decision is admissible only if the reference's
    score lies within the tolerance of tau (or its two least dense pairs within it of
    each other), i.e. only where ``decision_margins`` says the decision is not clear.

    The tolerance is the candidate's decision tolerance times max(1, the largest score
    of the reference's run): scores are O(1) when normalized, unbounded when not.
    """
    context = Context(candidate, case)
    trace = trace_to_numpy(got.trace)
    if case.trace is not None:
        assert_close(got.trace.boundary, case.trace.boundary, 0, "forced trace.boundary", context)
        assert_close(got.trace.merged, case.trace.merged, 0, "forced trace.merged", context)
        return
    tol = decision_tolerance(candidate, case, got)
    args = {name: value for name, value in case.arguments().items() if name != "trace"}
    try:
        miss = dla_ref.check_trace(**args, trace=trace, score_tol=tol, density_tol=tol)
    except ValueError as exc:
        context.fail(f"its trace does not fit the cache: {exc}")
    if miss is not None:
        context.fail(f"{miss} (tolerance {tol:g})")
    tau, K = case.options["tau"], case.options["capacity"]
    if tau <= 0 and K >= 2 and not trace.boundary.all():
        b, t, h = min(np.argwhere(~trace.boundary).tolist(), key=lambda i: (i[1], i[0], i[2]))
        context.fail(f"tau = {tau} <= 0 and every score is >= 0, so every token must open "
                     f"a slot (the rule is I_t >= tau); token t={t}, b={b}, h={h} did not")


def decision_tolerance(candidate: Candidate, case: Case, got: dla_ref.Result) -> float:
    """The candidate's decision tolerance times max(1, max |I_t| of the reference's run)."""
    scores = dla_ref.dla(**case.arguments()).trace.scores
    return candidate_tolerance(candidate, got).decision * max(1.0, float(np.max(np.abs(scores))))


def candidate_tolerance(candidate: Candidate, got: dla_ref.Result) -> Tolerance:
    """The tolerance row for the candidate (an undeclared state dtype is read from S)."""
    return tolerance(candidate.state_dtype or describe(got.cache.S)[2], candidate.dtype)


# --- layer 2: apply ------------------------------------------------------------------------------


def check_apply(candidate: Candidate, case: Case, got: dla_ref.Result) -> float:
    """Layer 2 of SPEC §4: under the candidate's own trace, the reference agrees.

    Replays the candidate's trace (boundary, merged) through ``dla_ref.dla`` on the
    same inputs and compares: o and cache.S within the values tolerance; trace
    scores within decision * max(1, |I_t|); cache.info within decision * max(n, |J|)
    (a sum of n scores); cache.n, cache.m exactly. Returns the largest share of a
    budget used.
    """
    context = Context(candidate, case)
    tol = candidate_tolerance(candidate, got)
    trace = trace_to_numpy(got.trace)
    try:
        want = dla_ref.dla(**{**case.arguments(), "trace": trace})
    except ValueError as exc:
        context.fail(f"its trace does not fit the cache: {exc}")
    values = lambda x: tol.atol + tol.rtol * (np.max(np.abs(x)) if x.size else 0)  # noqa: E731
    shares = [
        assert_close(got.o, want.o, values(want.o), "o", context),
        assert_close(got.cache.S, want.cache.S, values(want.cache.S), "cache.S", context),
        assert_close(got.cache.n, want.cache.n, 0, "cache.n", context),
        assert_close(got.cache.m, want.cache.m, 0, "cache.m", context),
        assert_close(got.trace.scores, want.trace.scores,
                     tol.decision * np.maximum(1, np.abs(want.trace.scores)),
                     "trace.scores", context),
        assert_close(got.cache.info, want.cache.info,
                     tol.decision * np.maximum(want.cache.n, np.abs(want.cache.info)),
                     "cache.info", context),
    ]
    return max(shares)


# --- both layers --------------------------------------------------------------------------------


def check_case(candidate: Candidate, case: Case) -> float:
    """Run the candidate on the case and check its layout, decisions and values.

    The reference sees the inputs exactly as the candidate received them (rounded to
    its dtype). Returns the largest share of a tolerance budget used; raises
    AssertionError on any failure and NotImplementedError when the candidate does not
    support the case's options.
    """
    given = case.as_given_to(candidate)
    got = run_candidate(candidate, case)
    check_layout(candidate, given, got)
    check_decide(candidate, given, got)
    return check_apply(candidate, given, got)


def assert_matches_reference(fn: Callable, q, k, v, lam, *, state_dtype: str | None = None,
                             **options) -> float:
    """Check any callable with the dla signature against ``dla_ref.dla``.

    q, k, v, lam (and log_alpha, beta, trace, initial_cache in ``options``) are the
    arrays the callable takes, in its namespace, device and dtype; ``options`` are
    the keyword arguments of ``dla_ref.dla``. ``state_dtype`` ("float32", ...) is the
    dtype it keeps S, info and scores in; if None it is read from its result. Runs
    the decide and apply layers (``check_case``) and returns the largest share of a
    tolerance budget used; raises AssertionError with a reproducer on failure.
    """
    arrays = dict(q=q, k=k, v=v, lam=lam, log_alpha=options.pop("log_alpha", None),
                  beta=options.pop("beta", None))
    records = {name: options.pop(name, None) for name in ("trace", "initial_cache")}
    defaults = dict(backbone="linear", tau=0.6, capacity=30, score="token", normalize=True,
                    slots="oldest-first")
    if set(options) - set(defaults):
        raise TypeError(f"unexpected options {sorted(set(options) - set(defaults))}")
    case = Case(**{name: widened(x) for name, x in arrays.items()},
                options={**defaults, **options}, trace=widened_record(records["trace"]),
                initial_cache=widened_record(records["initial_cache"]))
    return check_case(candidate_for(fn, q, state_dtype), case)


# --- Hypothesis strategies and seeded specs ----------------------------------------------------


def draw_spec(pick: Callable[[str, tuple], Any], backbone: str | None = None) -> CaseSpec:
    """A CaseSpec whose every field is chosen by ``pick(name, options)``.

    The options list the simplest first (Hypothesis shrinks towards it) and aim at
    the known bug sites: T = 1 and T not a multiple of a chunk (1..24), K = 1, 2,
    >= T, reached exactly and exceeded by one, scores at tau (tau "at-score", 0),
    tau = +-inf, exact ties (repeated tokens), decay extremes, zero and tiny keys,
    odd head sizes (1..8), initial caches, forced traces and strided inputs.
    ``backbone`` fixes the backbone instead of drawing it.
    """
    T = pick("T", tuple(range(1, 25)))
    capacity = pick("capacity", (4, 1, 2, 3, 5, 8, T, T + 1, "reached", "exceeded"))
    return CaseSpec(
        seed=pick("seed", tuple(range(2**16))),
        B=pick("B", (1, 2)), T=T, H=pick("H", (1, 2)),
        Dk=pick("Dk", tuple(range(1, 9))), Dv=pick("Dv", tuple(range(1, 9))),
        capacity=capacity,
        backbone=backbone or pick("backbone", dla_ref.BACKBONES),
        score=pick("score", dla_ref.SCORES),
        normalize=pick("normalize", (True, False)),
        slots=pick("slots", dla_ref.SLOT_ORDERS),
        tau=pick("tau", (0.6, 0.3, 1.0, 1.4, "at-score", 0.0, math.inf, -math.inf)),
        decay=pick("decay", ("moderate", "none", "extreme", "mixed")),
        keys=pick("keys", ("normal", "zero", "tiny")),
        tokens=pick("tokens", ("random", "segments", "repeated")),
        split=pick("split", (0, 0, 1, 5)),
        forced_trace=pick("forced_trace", (False, False, False, True)),
        noncontiguous=pick("noncontiguous", (False, True)),
    )


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


# --- named regression cases -------------------------------------------------------------------

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
}
