"""The host-side contract every kernel goes through (``dla_backends.host``), per kernel.

Each kernel of the registry is called directly (not through dispatch): an empty batch
(B = 0 or H = 0) gives the reference's shapes, an empty head (Dk or Dv = 0) the
reference's error. Namespaces follow dla_ref's one rule on every backend: a trace or an
initial cache of another namespace is converted and gives exactly what native arrays
give; token inputs (k, log_alpha, ...) of another namespace than q raise the reference's
TypeError, which names both. A q the backend does not take, a non-array and an unknown
keyword are TypeErrors naming the argument. The expected side is dla_ref (shapes,
messages) or the same backend on native arrays (values).
"""

from __future__ import annotations

import numpy as np
import pytest

import dla_ref
from dla_backends import host, registry
from dla_backends.testing import to_native

# the kernels of dla_backends.kernels, each called directly
NATIVE = [name for name, impl in registry.implementations("dla").items()
          if impl.loader.startswith("dla_backends.kernels.")]


def runnable(name):
    """The implementation ``name`` and the namespace it takes (skipped with the reason if it
    cannot run here)."""
    impl = registry.get(name)
    ok, why = impl.available()
    if not ok:
        pytest.skip(f"{name} is not available here: {why}")
    if "cpu" not in impl.devices:
        pytest.skip(f"{name} runs on {impl.devices} only; this test feeds CPU arrays")
    return impl, impl.namespaces[0]


def inputs(B, T, H, Dk, Dv, K, backbone, seed=0):
    """Random valid NumPy inputs of ``backbone`` in float64: q, k, v, lam, log_alpha, beta."""
    rng = np.random.default_rng(seed)
    x = dict(q=rng.standard_normal((B, T, H, Dk)), k=rng.standard_normal((B, T, H, Dk)),
             v=rng.standard_normal((B, T, H, Dv)), lam=rng.random((B, T, H, K)),
             log_alpha=None, beta=None)
    if backbone != "linear":
        x["log_alpha"] = -rng.random((B, T, H))
    if backbone == "gdn":  # unit-norm keys, as gdn expects
        x["k"] /= np.maximum(np.linalg.norm(x["k"], axis=3, keepdims=True), 1e-12)
        x["beta"] = rng.random((B, T, H))
    return x


def native(arrays, namespace, dtype="float64"):
    """Every array (or record of arrays) of ``arrays`` in ``namespace`` on the CPU."""
    def convert(x):
        if x is None:
            return None
        if isinstance(x, (dla_ref.Cache, dla_ref.Trace)):
            return type(x)(*(convert(y) for y in x))
        return to_native(np.asarray(host.to_host(x)), namespace, "cpu", dtype)
    return {name: convert(x) for name, x in arrays.items()}


def backbone_of(name):
    """gdn where the backend computes it (the chunked ones do not), else mamba2."""
    return "gdn" if "gdn" in registry.get(name).backbones else "mamba2"


def leaves(result):
    """(name, array) for every array of a Result."""
    return [("o", result.o), *zip(("S", "n", "info", "m"), result.cache),
            *zip(("scores", "boundary", "merged"), result.trace)]


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("B, H", [(0, 2), (2, 0)], ids=["B=0", "H=0"])
def test_an_empty_batch_has_the_references_shapes(name, B, H):
    impl, namespace = runnable(name)
    backbone = backbone_of(name)
    x = inputs(B, 3, H, 4, 5, 3, backbone)
    want = dla_ref.dla(**x, backbone=backbone, capacity=3)
    got = impl.load()(**native(x, namespace), backbone=backbone, capacity=3)
    for (field, g), (_, w) in zip(leaves(got), leaves(want)):
        assert tuple(g.shape) == tuple(w.shape), field
        assert host.to_host(g).dtype.kind == np.asarray(w).dtype.kind, field


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("Dk, Dv", [(0, 3), (3, 0)], ids=["Dk=0", "Dv=0"])
def test_an_empty_head_raises_the_references_error(name, Dk, Dv):
    impl, namespace = runnable(name)
    x = inputs(1, 2, 1, Dk, Dv, 2, "linear")
    with pytest.raises(ValueError) as want:
        dla_ref.dla(**x, capacity=2)
    with pytest.raises(ValueError) as got:
        impl.load()(**native(x, namespace), capacity=2)
    assert str(got.value) == str(want.value)


def other_namespace(namespace):
    """A namespace other than ``namespace`` that this machine has."""
    if namespace != "numpy":
        return "numpy"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "array_api_strict"
    return "torch"


@pytest.mark.parametrize("name", NATIVE)
def test_foreign_records_are_converted(name):
    """An initial cache and a forced trace of another namespace give exactly what the
    same arrays in the backend's namespace give."""
    impl, namespace = runnable(name)
    dla = impl.load()
    backbone = backbone_of(name)
    x = native(inputs(1, 6, 2, 3, 4, 3, backbone, seed=1), namespace)
    options = dict(backbone=backbone, capacity=3, tau=0.4)
    head = {n: None if a is None else a[:, :3] for n, a in x.items()}
    tail = {n: None if a is None else a[:, 3:] for n, a in x.items()}
    cache = dla(**head, **options).cache
    trace = dla(**tail, **options, initial_cache=cache).trace
    want = dla(**tail, **options, initial_cache=cache, trace=trace)

    elsewhere = native(dict(initial_cache=cache, trace=trace), other_namespace(namespace),
                       dtype=str(host.to_host(cache.S).dtype))
    got = dla(**tail, **options, **elsewhere)
    for (field, g), (_, w) in zip(leaves(got), leaves(want)):
        assert host.namespace_name(g) == namespace, field
        np.testing.assert_array_equal(host.to_host(g), host.to_host(w), err_msg=field)


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("argument", ["k", "lam", "log_alpha"])
def test_token_inputs_of_another_namespace_raise_the_references_error(name, argument):
    impl, namespace = runnable(name)
    x = inputs(1, 2, 1, 2, 2, 2, "mamba2")
    mixed = {**native(x, namespace), argument: native(x, other_namespace(namespace))[argument]}
    with pytest.raises(TypeError) as want:
        dla_ref.dla(**mixed, backbone="mamba2", capacity=2)
    with pytest.raises(TypeError) as got:
        impl.load()(**mixed, backbone="mamba2", capacity=2)
    assert str(got.value) == str(want.value)
    assert argument in str(got.value) and other_namespace(namespace) in str(got.value)


@pytest.mark.parametrize("name", NATIVE)
def test_bad_arguments_are_type_errors_that_name_them(name):
    impl, namespace = runnable(name)
    dla = impl.load()
    x = native(inputs(1, 2, 1, 2, 2, 2, "linear"), namespace)
    with pytest.raises(TypeError, match="q must be an array, got NoneType"):
        dla(**{**x, "q": None}, capacity=2)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'capacty'"):
        dla(**x, capacty=2)
    if other_namespace(namespace) not in impl.namespaces:
        with pytest.raises(TypeError, match=f"q must be a .*array for the {name} backend"):
            dla(**native(x, other_namespace(namespace)), capacity=2)
