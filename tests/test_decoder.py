"""dla_backends.Decoder: prefill then steps equals one dla() call, on every backend that
decodes; the cache is the backend's own, updated in place; bad input raises a named error.

The equality test runs on the ``backend`` fixture (tests/conftest.py, DLA_BACKENDS): each
candidate that can decode is compared with itself, one ``dla_backends.dla`` call over the
whole sequence against ``Decoder.prefill`` of a prefix and ``Decoder.step`` for the rest.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_backends
import dla_ref
from dla_backends.decoder import DECODERS
from dla_backends.testing import Candidate, to_native, to_numpy

B, H, DK, DV, K = 2, 2, 3, 4, 3


def sequence(T, backbone, seed):
    """NumPy float64 inputs [B, T, H, ...] of one backbone (gdn keys of unit norm)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H, DK))
    if backbone == "gdn":
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return dict(q=rng.standard_normal((B, T, H, DK)), k=k,
                v=rng.standard_normal((B, T, H, DV)), lam=rng.random((B, T, H, K)),
                log_alpha=None if backbone == "linear" else -0.3 * rng.random((B, T, H)),
                beta=rng.random((B, T, H)) if backbone == "gdn" else None)


def native(arrays, candidate: Candidate):
    return {name: None if x is None else to_native(x, candidate.namespace, candidate.device,
                                                   candidate.dtype)
            for name, x in arrays.items()}


def at(arrays, index):
    """Token(s) ``index`` of every array ([B, T, H, ...] -> [B, H, ...] or [B, T', H, ...])."""
    return {name: None if x is None else x[:, index, ...] for name, x in arrays.items()}


def decode(candidate, arrays, prompt, **options):
    """Decoder.prefill of the first ``prompt`` tokens (none: the first step opens the
    session), then one step per token.   -> (o [B, T, H, Dv] NumPy, decoder)"""
    decoder = dla_backends.Decoder(backend=candidate.implementation, record_trace=True,
                                   **options)
    outputs = [to_numpy(decoder.prefill(**at(arrays, slice(0, prompt))))] if prompt else []
    T = arrays["q"].shape[1]
    outputs += [to_numpy(decoder.step(**at(arrays, t)))[:, None] for t in range(prompt, T)]
    return np.concatenate(outputs, axis=1), decoder


def assert_same_run(got_o, decoder, want, candidate):
    """Outputs, cache and trace of the decoder equal one dla() call's: decisions exactly,
    values to rounding (some kernels sum in another order when T differs)."""
    tol = 1e-4 if "float64" not in (candidate.dtype, candidate.state_dtype) else 1e-10
    assert np.allclose(got_o, to_numpy(want.o), rtol=tol, atol=tol)
    for field, got, expected in zip(dla_ref.Cache._fields, decoder.cache, want.cache):
        assert np.allclose(to_numpy(got), to_numpy(expected), rtol=tol, atol=tol), field
    trace = decoder.trace
    assert np.array_equal(to_numpy(trace.boundary), to_numpy(want.trace.boundary))
    assert np.array_equal(to_numpy(trace.merged), to_numpy(want.trace.merged))
    assert np.allclose(to_numpy(trace.scores), to_numpy(want.trace.scores), rtol=tol, atol=tol)


def test_prefill_then_steps_is_one_dla_call(backend, examples):
    """On every decoding backend: any prompt length (0 = all steps), every backbone."""
    if backend.implementation not in DECODERS:
        pytest.skip(f"{backend.label} has no one-token path (decoders: {DECODERS})")

    @settings(max_examples=examples)
    @given(backbone=st.sampled_from(dla_ref.BACKBONES), T=st.integers(1, 8),
           data=st.data(), tau=st.sampled_from([0.3, 1.0, math.inf]),
           seed=st.integers(0, 2**16))
    def check(backbone, T, data, tau, seed):
        prompt = data.draw(st.integers(0, T), label="prompt")
        arrays = native(sequence(T, backbone, seed), backend)
        options = dict(backbone=backbone, capacity=K, tau=tau)
        want = dla_backends.dla(**arrays, **options, backend=backend.implementation)
        got_o, decoder = decode(backend, arrays, prompt, **options)
        assert decoder.backend == backend.implementation
        assert_same_run(got_o, decoder, want, backend)

    check()


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_prefills_and_steps_may_alternate(namespace):
    """prefill 3, step 2, prefill 2, step 1 is one dla() call over the 8 tokens."""
    candidate = Candidate("", None, namespace, "cpu", "float64", "float64", "")
    if namespace == "torch":
        pytest.importorskip("torch", reason="torch not installed")
    arrays = native(sequence(8, "mamba2", seed=5), candidate)
    options = dict(backbone="mamba2", capacity=K, tau=0.5)
    decoder = dla_backends.Decoder(record_trace=True, **options)
    outputs = [decoder.prefill(**at(arrays, slice(0, 3)))]
    outputs += [decoder.step(**at(arrays, t))[:, None] for t in (3, 4)]
    outputs += [decoder.prefill(**at(arrays, slice(5, 7))), decoder.step(**at(arrays, 7))[:, None]]
    want = dla_backends.dla(**arrays, **options)
    got = np.concatenate([to_numpy(x) for x in outputs], axis=1)
    assert decoder.backend == want.backend
    assert_same_run(got, decoder, want, candidate)


# --- the session on NumPy (numba where installed, else the reference) ---------------------


def numpy_session(backbone="mamba2", dtype=np.float64, **options):
    """A decoder after a prompt of 4 tokens, and the token arrays of one more step."""
    arrays = {n: None if x is None else x.astype(dtype)
              for n, x in sequence(5, backbone, seed=1).items()}
    decoder = dla_backends.Decoder(capacity=K, backbone=backbone, **options)
    decoder.prefill(**at(arrays, slice(0, 4)))
    return decoder, at(arrays, 4)


def test_the_default_backend_is_dla_s_choice():
    decoder, token = numpy_session()
    assert decoder.backend == dla_backends.select(token["q"]).name


def test_a_step_updates_the_backend_s_own_cache_in_place():
    decoder, token = numpy_session()
    storage = decoder.session.storage
    before = decoder.cache
    decoder.step(**token)
    assert all(a is b for a, b in zip(decoder.session.storage, storage))
    assert int(decoder.cache.n.sum()) == int(before.n.sum()) + B * H


def test_the_cache_is_a_snapshot():
    decoder, token = numpy_session()
    cache = decoder.cache
    S = cache.S.copy()
    decoder.step(**token)
    assert np.array_equal(cache.S, S)


def test_lam_may_be_omitted_or_broadcast():
    decoder, token = numpy_session()
    twin, _ = numpy_session()
    o = decoder.step(**{**token, "lam": None})
    assert np.array_equal(o, twin.step(**{**token, "lam": np.ones((1, 1, K))}))


@pytest.mark.parametrize("lam", [None, np.full((H, K), 0.5), np.full((B, H, 1), 0.5)])
def test_a_first_step_broadcasts_lam_like_dla(lam):
    token = at(sequence(1, "mamba2", seed=0), 0)
    full = np.broadcast_to(np.ones((B, H, K)) if lam is None else lam, (B, H, K))
    o = dla_backends.Decoder(capacity=K, backbone="mamba2").step(**{**token, "lam": lam})
    want = dla_backends.Decoder(capacity=K, backbone="mamba2").step(**{**token, "lam": full})
    assert np.array_equal(o, want)


def test_float16_numpy_decodes_with_float16_outputs():
    decoder, token = numpy_session(dtype=np.float16)
    assert decoder.step(**token).dtype == np.float16
    assert decoder.cache.S.dtype == np.float32


def test_the_trace_needs_record_trace():
    decoder, _ = numpy_session()
    with pytest.raises(ValueError, match="record_trace=True"):
        _ = decoder.trace


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("options, error, match", [
    (dict(capacity=0), ValueError, "capacity must be >= 1"),
    (dict(tau=math.nan), ValueError, "tau must not be NaN"),
    (dict(backbone="lstm"), ValueError, "backbone must be one of"),
    (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
    (dict(backend="torch-chunked"), ValueError, "'torch-chunked' has no one-token path"),
    (dict(record_trace="yes"), TypeError, "record_trace must be a bool"),
])
def test_bad_options_are_refused_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        dla_backends.Decoder(**options)


@given(name=st.sampled_from(["q", "k", "v"]),
       value=st.one_of(st.none(), st.integers(), st.text(max_size=3),
                       st.lists(st.floats(), max_size=3)))
def test_a_first_step_with_a_non_array_names_it(name, value):
    token = at(sequence(1, "linear", seed=0), 0)
    with pytest.raises(TypeError, match=f"^{name} must be an array"):
        dla_backends.Decoder(capacity=K).step(**{**token, name: value})


def test_a_first_step_must_be_one_token():
    arrays = sequence(2, "linear", seed=0)
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, Dk\] \(one token\)"):
        dla_backends.Decoder(capacity=K).step(**arrays)


@settings(max_examples=10)
@given(name=st.sampled_from(["q", "k", "v", "lam", "log_alpha"]),
       change=st.sampled_from(["shape", "dtype", "type"]))
def test_a_step_names_the_argument_that_changed(name, change):
    decoder, token = numpy_session()
    x = token[name]
    if change == "shape":
        bad, error = np.concatenate([x, x], axis=0), ValueError
    elif change == "dtype":
        bad, error = x.astype(np.float32), TypeError
    else:
        bad, error = x.tolist(), TypeError
    with pytest.raises(error, match=f"^{name} must"):
        decoder.step(**{**token, name: bad})


@settings(max_examples=20)
@given(name=st.sampled_from(["q", "k", "v", "lam", "log_alpha"]), data=st.data(),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_step_with_nan_or_inf_names_the_argument(name, data, value):
    decoder, token = numpy_session()
    bad = token[name].copy()
    bad[tuple(data.draw(st.integers(0, n - 1)) for n in bad.shape)] = value
    with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
        decoder.step(**{**token, name: bad})


@pytest.mark.parametrize("name, value, match", [
    ("lam", -0.5, "lam must be >= 0"),
    ("log_alpha", 0.5, "log_alpha must be <= 0"),
    ("beta", 1.5, r"beta must lie in \[0, 1\]"),
    ("beta", -0.5, r"beta must lie in \[0, 1\]"),
])
def test_a_step_with_an_out_of_range_value_names_it(name, value, match):
    decoder, token = numpy_session("gdn")
    bad = token[name].copy()
    bad.flat[0] = value
    with pytest.raises(ValueError, match=match):
        decoder.step(**{**token, name: bad})


def test_a_step_without_a_gate_its_backbone_needs_names_it():
    decoder, token = numpy_session("gdn")
    with pytest.raises(ValueError, match="^beta .* is required"):
        decoder.step(**{**token, "beta": None})


def test_a_step_with_a_gate_its_backbone_ignores_names_it():
    decoder, token = numpy_session("linear")
    with pytest.raises(ValueError, match="^log_alpha is not used by backbone='linear'"):
        decoder.step(**{**token, "log_alpha": np.zeros((B, H))})


def test_a_step_from_another_namespace_names_it():
    torch = pytest.importorskip("torch", reason="torch not installed")
    decoder, token = numpy_session()
    with pytest.raises(TypeError, match="^k must be a numpy array"):
        decoder.step(**{**token, "k": torch.from_numpy(token["k"])})
