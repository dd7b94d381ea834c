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
    if backbone == "gdn":
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
