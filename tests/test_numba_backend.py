"""What is specific to the Numba backend (dla_backends.kernels.numba_scan).

The general differential suite (tests/test_differential.py) runs "numba" through every
shared check. Here: its float32 and float64 states against the reference, the parallel
scan's determinism, the forced-trace errors it must take from the reference, the
private copies its in-place merges work on, and the on-disk JIT cache.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import dla_ref

numba = pytest.importorskip("numba", reason="numba is not installed (extra 'numba')")
numba_scan = pytest.importorskip("dla_backends.kernels.numba_scan")

# Errors are measured relative to the reference's largest magnitude (states grow with T).
# float64 keeps ~1e-16 per operation; float32 ~6e-8, over a few dozen tokens.
AGREEMENT_TOL = {np.float32: 1e-5, np.float64: 1e-11}
# Admissibility (docs/spec/trace.md): how far from tau, or from the least density, a decision of
# this dtype may legitimately land on the wrong side.
DECISION_TOL = {np.float32: 1e-5, np.float64: 1e-9}

# (score, normalize, slots, tau): every option value appears; tau sits inside the bulk of
# the scores that ``case`` produces, so that tokens both open slots and are absorbed.
OPTIONS = [
    ("token", True, "oldest-first", 1.0),
    ("token", False, "newest-first", 0.95),
    ("state", True, "newest-first", 0.25),
    ("state", False, "oldest-first", 0.8),
]
BACKBONES = ("linear", "mamba2", "gdn")
DTYPES = (np.float64, np.float32)


def case(seed, backbone, dtype, B=2, T=24, H=2, Dk=4, Dv=3, K=3):
    """Piecewise-stationary inputs: segments of ~3 tokens share a key and a value
    direction (plus noise), so scores are low inside a segment and high at its start.

    Returns (q, k, v, lam), {log_alpha, beta as the backbone needs} in ``dtype``.
    """
    rng = np.random.default_rng(seed)
    segment = np.cumsum(rng.random((B, T, H)) < 0.3, axis=1)[..., None]
    k = np.take_along_axis(rng.standard_normal((B, T + 1, H, Dk)), segment, axis=1)
    v = np.take_along_axis(rng.standard_normal((B, T + 1, H, Dv)), segment, axis=1)
    k = k + 0.3 * rng.standard_normal(k.shape)
    v = v + 0.3 * rng.standard_normal(v.shape)
    q = rng.standard_normal((B, T, H, Dk))
    lam = rng.uniform(0, 1, (B, T, H, K))
    extra = {}
    if backbone != "linear":
        extra["log_alpha"] = -rng.uniform(0, 0.3, (B, T, H))
    if backbone == "gdn":
        extra["beta"] = rng.uniform(0, 1, (B, T, H))
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return tuple(map(cast, (q, k, v, lam))), {name: cast(x) for name, x in extra.items()}


def relative_error(got, want):
    """max |got - want| / max |want| (absolute where want is all zero), in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if np.any(want) else 1.0
    return float(np.max(np.abs(got - want)) / scale)


def assert_agrees_with_reference(inputs, extra, options, dtype, initial_cache=None):
    """Run numba, check its trace is admissible and, with that trace forced, that the
    reference (float64) gives the same outputs, cache and scores within tolerance.

    Returns the numba result.
    """
    got = numba_scan.dla(*inputs, **extra, **options, initial_cache=initial_cache)
    assert got.o.dtype == dtype and got.cache.S.dtype == dtype and got.cache.info.dtype == dtype
    assert got.trace.scores.dtype == dtype and got.trace.boundary.dtype == np.bool_
    assert got.trace.merged.dtype == np.int64 and got.cache.n.dtype == np.int64
    assert got.cache.m.dtype == np.int64

    tol = DECISION_TOL[dtype]
    miss = dla_ref.check_trace(*inputs, got.trace, **extra, **options,
                               initial_cache=initial_cache, score_tol=tol, density_tol=tol)
    assert miss is None, str(miss)

    want = dla_ref.dla(*inputs, **extra, **options, initial_cache=initial_cache,
                       trace=got.trace)
    np.testing.assert_array_equal(got.cache.n, want.cache.n)
    np.testing.assert_array_equal(got.cache.m, want.cache.m)
    tol = AGREEMENT_TOL[dtype]
    for name, a, b in (("o", got.o, want.o), ("S", got.cache.S, want.cache.S),
                       ("info", got.cache.info, want.cache.info)):
        err = relative_error(a, b)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    # scores are O(1) when normalized and ratios of norms otherwise: compare relatively
    # to max(1, |I|)
    ref_scores = np.asarray(want.trace.scores, np.float64)
    err = np.max(np.abs(got.trace.scores - ref_scores) / np.maximum(1.0, np.abs(ref_scores)))
    assert err <= tol, f"scores: error {err:.2e} > {tol:.0e}"
    return got


def opened_absorbed_and_merged(result):
    """Did the run exercise both boundary outcomes after the first token, and merges?"""
    b = result.trace.boundary[:, 1:]
    return bool(np.any(b) and np.any(~b) and np.any(result.trace.merged >= 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("score, normalize, slots, tau", OPTIONS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_state_agrees_with_reference_under_its_own_trace(backbone, score, normalize, slots,
                                                          tau, dtype):
    options = dict(backbone=backbone, score=score, normalize=normalize, slots=slots,
                   tau=tau, capacity=3)
    for seed in range(2):
        inputs, extra = case(seed, backbone, dtype)
        got = assert_agrees_with_reference(inputs, extra, options, dtype)
        assert opened_absorbed_and_merged(got), "the case no longer exercises the decisions"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_capacity_one_is_the_single_state_backbone(backbone, dtype):
    inputs, extra = case(0, backbone, dtype, K=1)
    options = dict(backbone=backbone, capacity=1, tau=-np.inf)  # would always open a slot
    got = assert_agrees_with_reference(inputs, extra, options, dtype)
    assert not np.any(got.trace.boundary[:, 1:]) and np.all(got.trace.boundary[:, 0])
    assert np.all(got.trace.merged == -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_continues_from_an_initial_cache(backbone, dtype):
    """The reference's cache after 20 tokens (streams filled to different levels);
    numba goes on from it."""
    inputs, extra = case(1, backbone, dtype, T=30)
    options = dict(backbone=backbone, capacity=3, tau=0.25, score="state")
    head = slice(None, 20)
    first = dla_ref.dla(*(x[:, head] for x in inputs),
                        **{name: x[:, head] for name, x in extra.items()}, **options)
    cache = dla_ref.Cache(first.cache.S.astype(dtype), first.cache.n,
                          first.cache.info.astype(dtype), first.cache.m)
    tail = slice(20, None)
    got = assert_agrees_with_reference(tuple(x[:, tail] for x in inputs),
                                       {name: x[:, tail] for name, x in extra.items()},
                                       options, dtype, initial_cache=cache)
    assert np.any(got.trace.merged >= 0), "the case should fill the cache and merge"


def test_threads_do_not_change_the_result():
    """Streams are independent, so prange's schedule must not show in any output."""
    inputs, extra = case(2, "gdn", np.float32, B=3, H=3)
    options = dict(backbone="gdn", capacity=3, tau=1.0)
    runs = [numba_scan.dla(*inputs, **extra, **options) for _ in range(2)]
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        runs.append(numba_scan.dla(*inputs, **extra, **options))
    finally:
        numba.set_num_threads(before)
    flat = [np.concatenate([np.ravel(x).astype(np.float64) for x in
                            (r.o, *r.cache, *r.trace)]) for r in runs]
    for other in flat[1:]:
        np.testing.assert_array_equal(other, flat[0])


def bad_traces(B, T, H, K):
    """(boundary, merged, initial_cache) of forced traces that must be refused."""
    opens_all = np.ones((B, T, H), bool)
    no_merge = np.full((B, T, H), -1)
    cannot_start = opens_all.copy()
    cannot_start[0, 0, 0] = False
    merge_early = no_merge.copy()
    merge_early[0, 1, 0] = 0
    merge_out_of_range = np.where(np.arange(T)[None, :, None] >= K, K - 1, -1)
    full = dla_ref.Cache(np.ones((B, H, K, 4, 3)), np.ones((B, H, K), np.int64),
                         np.zeros((B, H, K)), np.full((B, H), K, np.int64))
    return [
        pytest.param(cannot_start, no_merge, None, id="empty cache without a boundary"),
        pytest.param(opens_all, merge_early, None, id="merge before the cache is full"),
        pytest.param(opens_all, no_merge, None, id="full cache, boundary without a merge"),
        pytest.param(opens_all, merge_out_of_range, None, id="merge index past K-2"),
        pytest.param(opens_all, no_merge, full, id="full initial cache, no merge"),
    ]


@pytest.mark.parametrize("boundary, merged, initial_cache", bad_traces(2, 6, 2, 3))
def test_forced_trace_that_does_not_fit_raises_the_reference_error(boundary, merged,
                                                                   initial_cache):
    inputs, _ = case(0, "linear", np.float64, T=6)
    trace = dla_ref.Trace(np.zeros(boundary.shape), boundary, merged)
    options = dict(capacity=3, trace=trace, initial_cache=initial_cache)
    with pytest.raises(ValueError) as reference:
        dla_ref.dla(*inputs, **options)
    with pytest.raises(ValueError) as numba_error:
        numba_scan.dla(*inputs, **options)
    assert str(numba_error.value) == str(reference.value)


def test_inputs_are_not_modified():
    """The scan merges in place on its own copies, never on the caller's cache or trace."""
    inputs, _ = case(0, "linear", np.float64, T=12)
    B, T, H, _ = inputs[0].shape
    K = 3
    cache = dla_ref.Cache(np.ones((B, H, K, 4, 3)), np.ones((B, H, K), np.int64),
                          np.arange(B * H * K, dtype=np.float64).reshape(B, H, K),
                          np.full((B, H), K, np.int64))
    kept_inputs = [np.copy(x) for x in (*cache, *inputs)]
    trace = numba_scan.dla(*inputs, capacity=K, tau=-np.inf, initial_cache=cache).trace
    assert np.all(trace.merged >= 0), "every token should merge into the full cache"
    kept_trace = [np.copy(x) for x in trace]
    numba_scan.dla(*inputs, capacity=K, initial_cache=cache, trace=trace)
    for before, after in zip(kept_inputs + kept_trace, (*cache, *inputs, *trace)):
        np.testing.assert_array_equal(after, before)


def test_non_contiguous_inputs_give_the_contiguous_result():
    inputs, extra = case(3, "gdn", np.float64)
    strided = tuple(np.repeat(x, 2, axis=-1)[..., ::2] for x in inputs)
    assert not any(x.flags.c_contiguous for x in strided)
    options = dict(backbone="gdn", capacity=3, tau=1.0)
    want = numba_scan.dla(*inputs, **extra, **options)
    got = numba_scan.dla(*strided, **extra, **options)
    for a, b in zip((got.o, *got.cache, *got.trace), (want.o, *want.cache, *want.trace)):
        np.testing.assert_array_equal(a, b)


def test_other_float_dtypes_are_refused():
    inputs, _ = case(0, "linear", np.float16)
    with pytest.raises(TypeError, match="float32 or float64"):
        numba_scan.dla(*inputs, capacity=3)


LOAD_FROM_CACHE = """
import json, numpy as np
from dla_backends.kernels import numba_scan
for dtype in (np.float32, np.float64):
    x = np.ones((1, 2, 1, 3), dtype)
    numba_scan.dla(x, x, x, np.ones((1, 2, 1, 2), dtype), capacity=2)
stats = numba_scan.scan_streams.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values())}))
"""


def test_a_fresh_process_loads_the_compiled_scan_from_the_jit_cache():
    for dtype in (np.float32, np.float64):  # compiles and saves, unless already cached
        x = np.ones((1, 2, 1, 3), dtype)
        numba_scan.dla(x, x, x, np.ones((1, 2, 1, 2), dtype), capacity=2)
    run = subprocess.run([sys.executable, "-c", LOAD_FROM_CACHE], capture_output=True,
                         text=True, timeout=120, check=True)
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    assert stats == {"hits": 2, "misses": 0}, run.stderr
