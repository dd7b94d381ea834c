"""Every bad input to the public functions raises the documented error, naming the argument."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref


def inputs(T=5, K=3, backbone="mamba2"):
    rng = np.random.default_rng(0)
    x = dict(q=rng.standard_normal((1, T, 2, 3)), k=rng.standard_normal((1, T, 2, 3)),
             v=rng.standard_normal((1, T, 2, 4)), lam=rng.random((1, T, 2, K)))
    gates = dict(backbone=backbone)
    if backbone != "linear":
        gates["log_alpha"] = -rng.random((1, T, 2))
    if backbone == "gdn":
        gates["beta"] = rng.random((1, T, 2))
    return x, gates


def with_(x, **changes):
    return {**x, **changes}


BAD_ARRAYS = [
    ("k", lambda x: x["k"][..., :2], ValueError, "k must have shape"),
    ("v", lambda x: x["v"][:, :3], ValueError, "v must have shape"),
    ("lam", lambda x: x["lam"][..., :2], ValueError, "lam must have a shape that broadcasts"),
    ("q", lambda x: x["q"].astype(np.int64), TypeError, "q must have a real floating dtype"),
    ("v", lambda x: np.where(np.arange(4) == 1, np.nan, x["v"]), ValueError, "v contains NaN"),
    ("k", lambda x: np.where(np.arange(3) == 0, np.inf, x["k"]), ValueError,
     "k contains NaN or inf"),
    ("lam", lambda x: -x["lam"], ValueError, "lam must be >= 0"),
    ("q", lambda x: x["q"][:, :0], ValueError, "at least one token"),
]


@pytest.mark.parametrize("name, bad, error, message", BAD_ARRAYS)
def test_bad_arrays(name, bad, error, message):
    x, gates = inputs()
    with pytest.raises(error, match=message):
        dla_ref.dla(**with_(x, **{name: bad(x)}), **gates, capacity=3)


@pytest.mark.parametrize("changes, error, message", [
    (dict(capacity=0), ValueError, "capacity must be >= 1"),
    (dict(capacity=2.0), TypeError, "capacity must be an int"),
    (dict(tau=float("nan")), ValueError, "tau must not be NaN"),
    (dict(tau="0.6"), TypeError, "tau must be a real number"),
    (dict(backbone="mamba3"), ValueError, "backbone must be one of"),
    (dict(score="tokens"), ValueError, "score must be one of"),
    (dict(slots="newest"), ValueError, "slots must be one of"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(eps=0.0), ValueError, "eps must be finite and > 0"),
])
def test_bad_options(changes, error, message):
    x, gates = inputs()
    with pytest.raises(error, match=message):
        dla_ref.dla(**x, **{**gates, "capacity": 3, **changes})


def test_infinite_tau_is_allowed():
    x, gates = inputs()
    for tau in (float("inf"), float("-inf")):
        dla_ref.dla(**x, **gates, capacity=3, tau=tau)


@pytest.mark.parametrize("backbone, changes, message", [
    ("mamba2", dict(log_alpha=None), "log_alpha .* is required"),
    ("mamba2", dict(log_alpha=np.full((1, 5, 2), 0.1)), "log_alpha must be <= 0"),
    ("gdn", dict(beta=np.full((1, 5, 2), 1.5)), r"beta must lie in \[0, 1\]"),
    ("gdn", dict(beta=None), "beta .* is required"),
    ("linear", dict(log_alpha=np.zeros((1, 5, 2))), "log_alpha is not used"),
    ("mamba2", dict(beta=np.zeros((1, 5, 2))), "beta is only used by backbone='gdn'"),
    ("mamba2", dict(log_alpha=np.zeros((1, 5, 3))), "log_alpha must have shape"),
])
def test_bad_gates(backbone, changes, message):
    x, gates = inputs(backbone=backbone)
    with pytest.raises(ValueError, match=message):
        dla_ref.dla(**x, **{**gates, **changes}, capacity=3)


def forced(boundary, merged, T=5):
    b = np.zeros((1, T, 2), dtype=bool)
    j = np.full((1, T, 2), -1)
    b[0, :, :] = np.array(boundary)[:, None]
    j[0, :, :] = np.array(merged)[:, None]
    return dla_ref.Trace(np.zeros((1, T, 2)), b, j)


@pytest.mark.parametrize("trace, capacity, message", [
    (forced([0, 0, 0, 0, 0], [-1] * 5), 3, "t=0: the cache is empty"),
    (forced([1, 1, 0, 0, 0], [-1] * 5), 1, "t=1: capacity is 1"),
    (forced([1, 1, 1, 1, 0], [-1] * 5), 3,
     r"t=3: the cache is full, so merged must lie in \[0, 1\]"),
    (forced([1, 1, 1, 1, 0], [-1, -1, -1, 2, -1]), 3, r"t=3: the cache is full"),
    (forced([1, 0, 0, 0, 0], [-1, 0, -1, -1, -1]), 3, "t=1: no merge happens here"),
])
def test_forced_traces_that_do_not_fit(trace, capacity, message):
    x, gates = inputs(K=capacity)
    with pytest.raises(ValueError, match=message):
        dla_ref.dla(**x, **gates, capacity=capacity, trace=trace)
    with pytest.raises(ValueError, match=message):
        dla_ref.materialized(**x, **gates, capacity=capacity, trace=trace)


def test_forced_trace_shapes_and_types():
    x, gates = inputs()
    good = forced([1, 0, 0, 0, 0], [-1] * 5)
    with pytest.raises(ValueError, match="trace.boundary must have shape"):
        dla_ref.dla(**x, **gates, capacity=3, trace=good._replace(boundary=good.boundary[:, :4]))
    with pytest.raises(TypeError, match="trace.boundary must be bool"):
        dla_ref.dla(**x, **gates, capacity=3, trace=good._replace(boundary=good.boundary * 1))
    with pytest.raises(TypeError, match="trace.merged must be an integer array"):
        dla_ref.dla(**x, **gates, capacity=3, trace=good._replace(merged=good.merged * 1.0))
    with pytest.raises(TypeError, match="trace must be a dla_ref.Trace"):
        dla_ref.dla(**x, **gates, capacity=3, trace=tuple(good))


def test_bad_initial_caches():
    x, gates = inputs()
    cache = dla_ref.dla(**x, **gates, capacity=3, tau=-1.0).cache  # full: m = 3
    with pytest.raises(ValueError, match="initial_cache.S must have shape"):
        dla_ref.dla(**x, **gates, capacity=3, initial_cache=cache._replace(S=cache.S[..., :2]))
    with pytest.raises(ValueError, match=r"initial_cache.m must lie in \[0, 3\]"):
        dla_ref.dla(**x, **gates, capacity=3, initial_cache=cache._replace(m=cache.m + 1))
    with pytest.raises(ValueError, match="initial_cache.n must be >= 1 in the m used slots"):
        dla_ref.dla(**x, **gates, capacity=3, initial_cache=cache._replace(m=cache.m - 1))
    with pytest.raises(ValueError, match="initial_cache.info must be >= 0"):
        dla_ref.dla(**x, **gates, capacity=3, initial_cache=cache._replace(info=-cache.info - 1))
    with pytest.raises(TypeError, match="initial_cache.n must be an integer array"):
        dla_ref.dla(**x, **gates, capacity=3, initial_cache=cache._replace(n=cache.n * 1.0))
    with pytest.raises(TypeError, match="initial_cache must be a dla_ref.Cache"):
        dla_ref.dla(**x, **gates, capacity=3, initial_cache=tuple(cache))


def test_other_entry_points_validate_too():
    x, gates = inputs(T=5)
    with pytest.raises(ValueError, match="lam must have at least 4 columns"):
        dla_ref.loglinear(**with_(x, lam=x["lam"][..., :3]), **gates)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        dla_ref.fixed(**x, **gates, capacity=3, chunk=0)
    u = np.zeros((6, 2))
    with pytest.raises(ValueError, match="starts must be strictly increasing"):
        dla_ref.deviation_bound(u, np.array([0, 3, 3]))
    with pytest.raises(ValueError, match="starts\\[0\\] must be 0"):
        dla_ref.deviation_bound(u, np.array([1, 3]))
    with pytest.raises(ValueError, match=r"\|w_t\| <= 1"):
        dla_ref.deviation(u, np.array([0]), np.ones(2), w=np.full(6, 2.0))


# --- what a user hits first: non-arrays, mixed namespaces, empty axes, scalars, gdn keys --

ENTRY_POINTS = {
    "dla": lambda **kw: dla_ref.dla(**kw, capacity=3),
    "fixed": lambda **kw: dla_ref.fixed(**kw, capacity=3, chunk=2),
    "materialized": lambda **kw: dla_ref.materialized(
        **kw, capacity=3, trace=dla_ref.Trace(np.zeros((1, 5, 2)), np.ones((1, 5, 2), bool),
                                              np.full((1, 5, 2), -1))),
    "loglinear": lambda **kw: dla_ref.loglinear(**with_(kw, lam=None)),
    "check_trace": lambda **kw: dla_ref.check_trace(
        **kw, capacity=3, trace=dla_ref.dla(**inputs()[0], **inputs()[1], capacity=3).trace),
}
ARGUMENTS = ("q", "k", "v", "lam", "log_alpha", "beta")
NOT_ARRAYS = (None, [[1.0]], "q", 3, 0.5, dla_ref.Trace)


@settings(max_examples=60)
@given(st.sampled_from(sorted(ENTRY_POINTS)), st.sampled_from(ARGUMENTS),
       st.sampled_from(NOT_ARRAYS))
def test_a_non_array_is_a_type_error_naming_the_argument(entry, name, bad):
    if entry == "loglinear" and name == "lam" or bad is None and name in ("lam", "log_alpha",
                                                                          "beta"):
        return  # lam, and the gates of the wrong backbone, may be None
    x, gates = inputs(backbone="gdn")
    kwargs = {**x, **gates, name: bad}
    with pytest.raises(TypeError, match=f"^{name} must be an array, got {type(bad).__name__}"):
        ENTRY_POINTS[entry](**kwargs)


@pytest.mark.parametrize("other", ["torch", "array_api_strict"])
@pytest.mark.parametrize("name", ARGUMENTS[1:])
def test_inputs_of_two_namespaces_are_a_type_error_naming_both(other, name):
    convert = pytest.importorskip(other, reason=f"{other} not installed").asarray
    x, gates = inputs(backbone="gdn")
    kwargs = {**x, **gates, name: convert(({**x, **gates})[name])}
    with pytest.raises(TypeError, match=f"^{name} is a {other} array but q is a numpy array"):
        dla_ref.dla(**kwargs, capacity=3)
    swapped = {key: (convert(a) if key != name else np.asarray(a)) for key, a in x.items()}
    swapped.update({key: convert(a) for key, a in gates.items() if key != "backbone"})
    swapped[name] = ({**x, **gates})[name]
    with pytest.raises(TypeError, match=f"^{name} is a numpy array but q is a {other} array"):
        dla_ref.dla(**swapped, backbone="gdn", capacity=3)


@pytest.mark.parametrize("axis, name", [(3, "Dk"), ("v", "Dv")])
def test_an_empty_key_or_value_axis_is_a_value_error_naming_it(axis, name):
    x, gates = inputs()
    if axis == "v":
        x = with_(x, v=x["v"][..., :0])
    else:
        x = with_(x, q=x["q"][..., :0], k=x["k"][..., :0])
    for entry in ("dla", "fixed", "materialized", "loglinear", "check_trace"):
        with pytest.raises(ValueError, match=f"^{name} .* must be >= 1, got 0"):
            ENTRY_POINTS[entry](**x, **gates)


def test_no_tokens_is_still_an_error():
    x, gates = inputs()
    empty = {k: a[:, :0] for k, a in {**x, **gates}.items() if isinstance(a, np.ndarray)}
    with pytest.raises(ValueError, match="at least one token"):
        dla_ref.dla(**empty, backbone="mamba2", capacity=3)


@pytest.mark.parametrize("capacity", [True, np.bool_(True), np.float64(3.0), "3"])
def test_the_capacity_is_an_integer_not_a_bool(capacity):
    x, gates = inputs()
    with pytest.raises(TypeError, match="capacity must be an int"):
        dla_ref.dla(**x, **gates, capacity=capacity)


@pytest.mark.parametrize("changes, message", [
    (dict(tau=np.bool_(True)), "tau must be a real number"),
    (dict(eps=True), "eps must be a real number"),
    (dict(tau=np.float32("nan")), "tau must not be NaN"),
])
def test_numpy_scalars_are_validated_as_numbers(changes, message):
    x, gates = inputs()
    with pytest.raises((TypeError, ValueError), match=message):
        dla_ref.dla(**x, **gates, capacity=3, **changes)


def gdn_case(key_norm_squared, beta=1.0, T=6):
    """gdn inputs whose keys all have ||k||^2 = key_norm_squared, beta constant."""
    x, gates = inputs(T=T, backbone="gdn")
    k = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True) * np.sqrt(key_norm_squared)
    return with_(x, k=k), with_(gates, beta=np.full_like(gates["beta"], beta))


def test_gdn_warns_once_when_a_transition_expands_the_state():
    x, gates = gdn_case(key_norm_squared=4.0, beta=0.75)  # beta ||k||^2 = 3 > 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dla_ref.dla(**x, **gates, capacity=3)
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "unit-norm keys" in str(caught[0].message) and "> 2" in str(caught[0].message)


@pytest.mark.parametrize("key_norm_squared, beta", [(1.0, 1.0), (2.0, 0.99), (4.0, 0.49)])
def test_gdn_does_not_warn_when_every_transition_is_a_contraction(key_norm_squared, beta):
    x, gates = gdn_case(key_norm_squared, beta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dla_ref.dla(**x, **gates, capacity=3)
