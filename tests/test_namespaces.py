"""The reference is array-API code: the same functions run on array_api_strict and torch
tensors and agree with NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import dla_ref

BACKBONES = ("linear", "mamba2", "gdn")


def namespace(name):
    if name == "array_api_strict":
        xps = pytest.importorskip("array_api_strict", reason="array_api_strict not installed")
        return xps.asarray, lambda a: np.from_dlpack(a)
    torch = pytest.importorskip("torch", reason="torch not installed")
    return torch.asarray, lambda a: a.numpy()


def case(backbone, T=9, K=3):
    rng = np.random.default_rng(1)
    x = dict(q=rng.standard_normal((2, T, 2, 3)), k=rng.standard_normal((2, T, 2, 3)),
             v=rng.standard_normal((2, T, 2, 2)), lam=rng.random((2, T, 2, K)))
    opts = dict(backbone=backbone, capacity=K, tau=1.2, slots="newest-first")
    if backbone != "linear":
        opts["log_alpha"] = -rng.random((2, T, 2))
    if backbone == "gdn":  # unit-norm keys (docs/spec/backbones.md)
        x["k"] = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True)
        opts["beta"] = rng.random((2, T, 2))
    return x, opts


@pytest.mark.parametrize("name", ["array_api_strict", "torch"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_reference_runs_on_other_namespaces(name, backbone):
    to, back = namespace(name)
    x, opts = case(backbone)
    want = dla_ref.dla(**x, **opts)
    conv = {k: (to(v) if isinstance(v, np.ndarray) else v) for k, v in {**x, **opts}.items()}
    got = dla_ref.dla(**conv)
    assert type(got.o) is type(conv["q"])
    np.testing.assert_allclose(back(got.o), want.o, rtol=1e-12, atol=1e-12)
    for a, b in zip(got.cache + got.trace, want.cache + want.trace):
        np.testing.assert_allclose(back(a), b, rtol=1e-12, atol=1e-12)
    forced = dla_ref.materialized(**{k: conv[k] for k in ("q", "k", "v", "lam")},
                                  trace=got.trace, **{k: conv[k] for k in conv
                                                      if k in ("backbone", "log_alpha", "beta",
                                                               "capacity", "slots")})
    np.testing.assert_allclose(back(forced), want.o, rtol=1e-9, atol=1e-9)
    assert dla_ref.check_trace(**conv, trace=got.trace) is None


# --- records and scalars that come from elsewhere ----------------------------------------

NAMESPACES = ["numpy", "array_api_strict", "torch"]


def converter(name):
    """(to, back): NumPy -> the namespace, and back to NumPy."""
    if name == "numpy":
        return np.asarray, np.asarray
    return namespace(name)


def record_to(to, record):
    """A Trace or Cache with every array converted by ``to``."""
    return type(record)(*(to(a) for a in record))


@pytest.mark.parametrize("inputs_in, records_in", [(a, b) for a in NAMESPACES
                                                     for b in NAMESPACES if a != b])
def test_a_trace_or_cache_of_any_namespace_is_accepted(inputs_in, records_in):
    to, back = converter(inputs_in)
    rec, _ = converter(records_in)
    x, opts = case("gdn")
    want = dla_ref.dla(**x, **opts)
    conv = {k: (to(v) if isinstance(v, np.ndarray) else v) for k, v in {**x, **opts}.items()}
    trace = record_to(rec, want.trace)
    forced = dla_ref.dla(**conv, trace=trace)
    np.testing.assert_allclose(back(forced.o), want.o, rtol=1e-12, atol=1e-12)
    assert dla_ref.check_trace(**conv, trace=trace) is None
    o = dla_ref.materialized(**{k: conv[k] for k in ("q", "k", "v", "lam")}, trace=trace,
                             **{k: conv[k] for k in ("backbone", "log_alpha", "beta",
                                                      "capacity", "slots")})
    np.testing.assert_allclose(back(o), want.o, rtol=1e-9, atol=1e-9)
    head = dla_ref.dla(**{k: (v[:, :4] if isinstance(v, np.ndarray) else v)
                          for k, v in {**x, **opts}.items()})
    tail = dla_ref.dla(**{k: (v[:, 4:, ...] if hasattr(v, "shape") else v)
                          for k, v in conv.items()},
                       initial_cache=record_to(rec, head.cache))
    np.testing.assert_allclose(back(tail.o), want.o[:, 4:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["array_api_strict", "torch"])
def test_partition_lam_broadcasting_and_numpy_scalars_in_other_namespaces(name):
    to, back = namespace(name)
    x, opts = case("mamba2")
    H, K = x["lam"].shape[2:]
    per_head = np.random.default_rng(2).random((H, K))
    opts = dict(opts, capacity=np.int64(K), tau=np.float32(1.2), eps=np.float64(1e-6))
    want = dla_ref.dla(**dict(x, lam=np.broadcast_to(per_head, x["lam"].shape)), **opts)
    conv = {k: (to(v) if isinstance(v, np.ndarray) else v)
            for k, v in {**x, "lam": per_head, **opts}.items()}
    got = dla_ref.dla(**conv)
    np.testing.assert_allclose(back(got.o), want.o, rtol=1e-12, atol=1e-12)
    part, want_part = dla_ref.partition(got), dla_ref.partition(want)
    assert type(part.starts) is type(conv["q"])
    for a, b in zip(part, want_part):
        np.testing.assert_array_equal(back(a), b)
    assert dla_ref.check_trace(**conv, trace=got.trace, score_tol=np.float32(1e-6)) is None
