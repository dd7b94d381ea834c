"""dla_backends.dla dispatch: which implementation runs for which arrays, and the errors;
and the test backends' names (DLA_BACKENDS), which pick implementation, device and dtype.

``select`` is the decision; ``dla`` only forwards to what it selected, so the routing is
tested on ``select`` (no kernel is compiled here) and the forwarding once with a stand-in.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dla_backends
import dla_ref
from dla_backends import Implementation, registry, testing


def numpy_q(dtype=np.float64):
    return np.zeros((1, 3, 1, 2), dtype=dtype)


def without(monkeypatch, name):
    """Make implementation ``name`` report itself unavailable for this test."""
    impl = registry.get(name)
    monkeypatch.setitem(registry._REGISTRY["dla"], name,
                        replace(impl, available=lambda: (False, "switched off by the test")))


def test_numpy_goes_to_numba_when_available(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY["dla"], "numba",
                        replace(registry.get("numba"), available=lambda: (True, "")))
    assert dla_backends.select(numpy_q()).name == "numba"


def test_numpy_falls_back_to_the_reference_without_numba(monkeypatch):
    without(monkeypatch, "numba")
    assert dla_backends.select(numpy_q()).name == "reference"


def test_float16_numpy_goes_to_numba_through_float32():
    assert dla_backends.select(numpy_q(np.float16)).name == "numba"
    assert "float16" in registry.get("numba").via_float32


def test_a_dtype_no_native_implementation_takes_goes_to_the_reference():
    xps = pytest.importorskip("array_api_strict", reason="array_api_strict not installed")
    assert dla_backends.select(xps.asarray(numpy_q(np.float32))).name == "reference"


def test_a_backbone_an_implementation_lacks_passes_it_over():
    torch = pytest.importorskip("torch", reason="torch not installed")
    q = torch.zeros(1, 3, 1, 2)
    assert dla_backends.select(q, operation="loglinear", backbone="mamba2").name \
        == "torch-chunked"
    assert dla_backends.select(q, operation="loglinear", backbone="gdn").name == "reference"


def test_array_api_strict_goes_to_the_reference():
    xps = pytest.importorskip("array_api_strict", reason="array_api_strict not installed")
    assert dla_backends.select(xps.asarray(numpy_q())).name == "reference"


def test_torch_goes_to_torch():
    torch = pytest.importorskip("torch", reason="torch not installed")
    assert dla_backends.select(torch.zeros(1, 3, 1, 2)).name == "torch"


def test_torch_cuda_prefers_triton():
    torch = pytest.importorskip("torch", reason="torch not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert dla_backends.select(torch.zeros(1, 3, 1, 2, device="cuda")).name == "triton"


def test_explicit_backend_is_used():
    assert dla_backends.select(numpy_q(), backend="reference").name == "reference"
    assert dla_backends.select(numpy_q(), backend="cuda-model").name == "cuda-model"


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown backend 'nope'") as error:
        dla_backends.select(numpy_q(), backend="nope")
    for name in dla_backends.implementations():
        assert repr(name) in str(error.value)


@pytest.mark.parametrize("name, q, why", [
    ("torch", numpy_q(), "takes torch arrays, not numpy"),
    ("cuda-model", numpy_q(np.float16), "takes float32/float64, not float16"),
    ("cupy", numpy_q(), "takes cupy arrays, not numpy"),
])
def test_an_implementation_that_cannot_take_the_array_says_why(name, q, why):
    with pytest.raises(ValueError, match=f"backend '{name}' {why}"):
        dla_backends.select(q, backend=name)


def test_an_unavailable_backend_says_why(monkeypatch):
    without(monkeypatch, "numba")
    with pytest.raises(RuntimeError, match="'numba' is not available here: switched off"):
        dla_backends.select(numpy_q(), backend="numba")


def test_dla_forwards_arrays_and_options_to_the_selected_implementation(monkeypatch):
    calls = []
    q = numpy_q()

    def stand_in(**kw):
        calls.append(kw)
        return dla_ref.Result(q, None, None)

    impl = Implementation("stand-in", ("numpy",), ("cpu",), ("float64",), "unused:unused")
    monkeypatch.setattr(Implementation, "load", lambda self: stand_in)
    monkeypatch.setattr(dla_backends, "select", lambda *args, **kw: impl)
    lam = np.ones((1, 3, 1, 2))
    result = dla_backends.dla(q, q, q, lam, tau=0.5, capacity=2)
    assert calls[0]["q"] is q and calls[0]["lam"] is lam
    assert calls[0]["tau"] == 0.5 and calls[0]["capacity"] == 2 and "dtype" not in calls[0]
    assert result.backend == "stand-in"  # named by the dispatch, as the implementation did not


def test_dla_takes_exactly_the_keywords_of_dla_ref():
    ours = inspect.signature(dla_backends.dla).parameters
    theirs = inspect.signature(dla_ref.dla).parameters
    assert [p for p in ours if p != "backend"] == list(theirs)
    assert all(ours[p].kind == theirs[p].kind and ours[p].default == theirs[p].default
               for p in theirs)
    assert list(inspect.signature(dla_backends.loglinear).parameters) \
        == list(inspect.signature(dla_ref.loglinear).parameters) + ["backend"]


def test_importing_the_package_loads_no_optional_package():
    """dla_backends (and its testing, check and golden modules) import only numpy,
    array-api-compat and dla_ref: accelerators and test tools load when used."""
    code = ("import sys, dla_backends, dla_backends.testing, dla_backends.cli.check, "
            "dla_backends.testing.golden\n"
            "heavy = ('torch', 'numba', 'triton', 'cupy', 'hypothesis', 'pytest', "
            "'array_api_strict')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- through dla: the dtype policy, the backend named, the conveniences --------------------


def inputs(B=1, T=6, H=2, D=3, K=3, dtype=np.float64, backbone="mamba2", seed=0):
    """NumPy inputs of dla (log_alpha for mamba2, and beta too for gdn)."""
    rng = np.random.default_rng(seed)
    x = dict(q=rng.standard_normal((B, T, H, D)), k=rng.standard_normal((B, T, H, D)) / D,
             v=rng.standard_normal((B, T, H, D)), lam=rng.random((B, T, H, K)))
    if backbone != "linear":
        x["log_alpha"] = -0.5 * rng.random((B, T, H))
    if backbone == "gdn":
        x["beta"] = rng.random((B, T, H))
    return {name: a.astype(dtype) for name, a in x.items()}


def cpu_implementations():
    """Every dla implementation that takes arrays on the CPU, with the namespace it takes."""
    return [(name, impl.namespaces[0]) for name, impl in registry.implementations().items()
            if "cpu" in impl.devices]


def as_namespace(arrays, namespace):
    if namespace == "numpy":
        return arrays
    torch = pytest.importorskip(namespace, reason=f"{namespace} not installed")
    return {name: torch.from_numpy(x) for name, x in arrays.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, namespace", cpu_implementations())
def test_every_backend_keeps_the_dtype_policy_and_names_itself(name, namespace, dtype):
    """o in the inputs' result dtype, S/info/scores in the implementation's state dtype."""
    impl = registry.get(name)
    ok, why = impl.available()
    if not ok:
        pytest.skip(f"{name} unavailable: {why}")
    arrays = as_namespace(inputs(dtype=np.dtype(dtype), T=3), namespace)
    result = dla_backends.dla(**arrays, capacity=3, backbone="mamba2", backend=name)
    state = impl.state_dtype_for(dtype)
    assert testing.to_numpy(result.o).dtype == np.dtype(dtype)
    for x in (result.cache.S, result.cache.info, result.trace.scores):
        assert testing.to_numpy(x).dtype == np.dtype(state)
    assert result.backend == name


def test_float16_numpy_runs_natively_with_float16_outputs():
    arrays = inputs(dtype=np.float16)
    result = dla_backends.dla(**arrays, capacity=3, backbone="mamba2")
    want = dla_ref.dla(**arrays, capacity=3, backbone="mamba2")
    assert result.backend == dla_backends.select(arrays["q"]).name
    assert result.o.dtype == np.float16 and result.cache.S.dtype == np.float32
    assert np.allclose(result.o, want.o, atol=1e-2, rtol=1e-2)


def test_the_dtype_keyword_is_the_computing_dtype():
    arrays = inputs(dtype=np.float32)
    result = dla_backends.dla(**arrays, capacity=3, backbone="mamba2", dtype=np.float64,
                              backend="numba")
    assert result.cache.S.dtype == np.float64 and result.o.dtype == np.float32
    with pytest.raises(ValueError, match="backend 'cuda-model' computes in float32 for "
                                         "float32 inputs, not float16"):
        dla_backends.dla(**arrays, capacity=3, backbone="mamba2", dtype=np.float16,
                         backend="cuda-model")


@pytest.mark.parametrize("lam", [None, np.full((2, 3), 0.5), np.full((1, 6, 2, 1), 0.5)])
def test_lam_may_be_omitted_or_broadcast(lam):
    arrays = inputs()
    full = np.broadcast_to(np.ones((1, 6, 2, 3)) if lam is None else lam, (1, 6, 2, 3))
    got = dla_backends.dla(**{**arrays, "lam": lam}, capacity=3, backbone="mamba2")
    want = dla_backends.dla(**{**arrays, "lam": full}, capacity=3, backbone="mamba2")
    assert np.array_equal(got.o, want.o) and got.backend == want.backend


@pytest.mark.parametrize("name, namespace", cpu_implementations())
def test_an_empty_batch_gives_what_the_reference_gives(name, namespace):
    if not registry.get(name).available()[0]:
        pytest.skip(f"{name} unavailable: {registry.get(name).available()[1]}")
    arrays = as_namespace(inputs(B=0), namespace)
    got = dla_backends.dla(**arrays, capacity=3, backbone="mamba2", backend=name)
    want = dla_ref.dla(**inputs(B=0), capacity=3, backbone="mamba2")
    assert tuple(got.o.shape) == want.o.shape
    assert [tuple(x.shape) for x in got.cache] == [x.shape for x in want.cache]


# --- loglinear ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["linear", "mamba2", "gdn"])
@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_loglinear_is_dispatched_and_computes_the_reference(namespace, backbone):
    arrays = inputs(backbone=backbone, T=9, K=5)
    want = dla_ref.loglinear(**arrays, backbone=backbone)
    got = dla_backends.loglinear(**as_namespace(arrays, namespace), backbone=backbone)
    assert np.allclose(testing.to_numpy(got), want, atol=1e-10)
    expected = ("torch-chunked" if namespace == "torch" and backbone != "gdn" else "reference")
    q = as_namespace(arrays, namespace)["q"]
    assert dla_backends.select(q, operation="loglinear", backbone=backbone).name == expected


def test_loglinear_levels_may_be_omitted():
    arrays = inputs(T=9)
    levels = dla_ref.fenwick_levels(9)
    want = dla_ref.loglinear(**{**arrays, "lam": np.ones((1, 9, 2, levels))}, backbone="mamba2")
    assert np.allclose(dla_backends.loglinear(**{**arrays, "lam": None}, backbone="mamba2"), want)


# --- bad input -------------------------------------------------------------------------------


NOT_ARRAYS = st.one_of(st.integers(), st.floats(), st.text(max_size=3),
                       st.lists(st.floats(), min_size=1, max_size=3), st.just(object()))


@given(name=st.sampled_from(["q", "k", "v", "lam", "log_alpha"]), value=NOT_ARRAYS)
def test_a_non_array_is_a_type_error_naming_it(name, value):
    arrays = inputs()
    with pytest.raises(TypeError, match=f"^{name} must be an array"):
        dla_backends.dla(**{**arrays, name: value}, capacity=3, backbone="mamba2")


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_a_missing_token_array_is_a_type_error_naming_it(name):
    with pytest.raises(TypeError, match=f"^{name} must be an array .*, got NoneType"):
        dla_backends.dla(**{**inputs(), name: None}, capacity=3, backbone="mamba2")


@given(name=st.sampled_from(["k", "v", "lam", "log_alpha"]),
       torch_side=st.sampled_from(["q", "other"]))
def test_token_inputs_of_two_namespaces_name_the_argument_and_both(name, torch_side):
    torch = pytest.importorskip("torch", reason="torch not installed")
    arrays = inputs()
    moved = [n for n in arrays if n != name] if torch_side == "q" else [name]
    mixed = {n: torch.from_numpy(x) if n in moved else x for n, x in arrays.items()}
    q_ns, other_ns = ("torch", "numpy") if torch_side == "q" else ("numpy", "torch")
    with pytest.raises(TypeError, match=f"^{name} is a {other_ns} array but q is a {q_ns} "):
        dla_backends.dla(**mixed, capacity=3, backbone="mamba2")


@pytest.mark.parametrize("companion", ["trace", "initial_cache"])
def test_traces_and_caches_of_another_namespace_are_converted(companion):
    torch = pytest.importorskip("torch", reason="torch not installed")
    arrays = inputs()
    first = dla_ref.dla(**arrays, capacity=3, backbone="mamba2")
    record = first.trace if companion == "trace" else first.cache
    want = dla_backends.dla(**arrays, capacity=3, backbone="mamba2", **{companion: record})
    as_torch = type(record)(*(torch.from_numpy(np.asarray(x)) for x in record))
    got = dla_backends.dla(**arrays, capacity=3, backbone="mamba2", **{companion: as_torch})
    assert np.array_equal(got.o, want.o) and got.backend == want.backend


# --- gradients: which implementations provide them, and routing requires-grad inputs ---------


def test_the_registry_says_which_implementations_provide_gradients():
    grads = {name for name, impl in registry.implementations().items() if impl.gradients}
    assert {"reference", "torch"} <= grads and not {"numba", "triton", "cupy"} & grads


def test_requires_grad_torch_inputs_go_where_the_grad_table_says(monkeypatch):
    torch = pytest.importorskip("torch", reason="torch not installed")
    monkeypatch.setitem(registry._PREFERENCES, ("dla", True), dict(registry.preferences(
        requires_grad=True)))
    q = torch.zeros(1, 3, 1, 2)
    assert registry.get(dla_backends.select(q, requires_grad=True).name).gradients
    dla_backends.prefer("dla", "torch", "cpu", ("torch-chunked",), requires_grad=True)
    assert dla_backends.select(q, requires_grad=True).name == "torch-chunked"
    assert dla_backends.select(q).name == "torch"  # the table without grad is untouched
    dla_backends.prefer("dla", "torch", "cpu", ("triton",), requires_grad=True)
    assert dla_backends.select(q, requires_grad=True).name == "reference"  # triton: no grads


def test_dla_on_requires_grad_tensors_is_differentiable():
    torch = pytest.importorskip("torch", reason="torch not installed")
    arrays = {n: torch.from_numpy(x).requires_grad_() for n, x in inputs().items()}
    result = dla_backends.dla(**arrays, capacity=3, backbone="mamba2")
    assert registry.get(result.backend).gradients
    result.o.sum().backward()
    assert arrays["q"].grad is not None


def test_an_explicit_backend_without_gradients_refuses_requires_grad_inputs():
    torch = pytest.importorskip("torch", reason="torch not installed")
    arrays = {n: torch.from_numpy(x).requires_grad_() for n, x in inputs().items()}
    with pytest.raises(ValueError, match="'triton' provides no gradients"):
        dla_backends.select(arrays["q"], "triton", requires_grad=True)


def test_preferring_an_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend"):
        dla_backends.prefer("dla", "torch", "cpu", ("nope",))


# --- the test backends: DLA_BACKENDS names ----------------------------------------------


@pytest.mark.parametrize("name, label", [
    ("reference", "reference@cpu:float64"),
    ("reference/torch@cuda", "reference/torch@cuda:float64"),
    ("numba:float32", "numba@cpu:float32"),
    ("cupy", "cupy@cuda:float64"),
])
def test_backend_names_pick_device_and_dtype(name, label):
    assert testing.get_backend(name).label == label


@pytest.mark.parametrize("name, error", [
    ("nope", "unknown test backend 'nope'; known: reference, reference/array_api_strict"),
    ("cupy@cpu", "'cupy' runs on cuda, not 'cpu'"),
    ("reference@cuda", "'reference' runs on cpu, not 'cuda'"),
    ("numba:float16", "'numba' takes float32/float64, not 'float16'"),
])
def test_bad_backend_names_say_what_is_known(name, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        testing.get_backend(name)


def run_pytest(backends: str) -> subprocess.CompletedProcess:
    """pytest on one named differential case, with DLA_BACKENDS set."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         f"tests/test_differential.py::test_named_case[{backends}-T=1]"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
        env={**os.environ, "DLA_BACKENDS": backends})


def test_an_unknown_dla_backends_name_stops_the_run():
    run = run_pytest("nope")
    assert run.returncode != 0
    assert "DLA_BACKENDS: unknown test backend 'nope'" in run.stdout + run.stderr


def test_an_unavailable_backend_is_skipped_with_its_reason():
    run = run_pytest("cupy")
    assert run.returncode == 0, run.stdout
    assert "SKIPPED" in run.stdout and "backend cupy unavailable:" in run.stdout
