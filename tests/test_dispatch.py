"""dla_backends.dla dispatch: which implementation runs for which arrays, and the errors;
and the test backends' names (DLA_BACKENDS), which pick implementation, device and dtype.

``select`` is the decision; ``dla`` only forwards to what it selected, so the routing is
tested on ``select`` (no kernel is compiled here) and the forwarding once with a stand-in.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import dla_backends
from dla_backends import registry, testing


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


def test_a_dtype_numba_does_not_take_goes_to_the_reference():
    assert dla_backends.select(numpy_q(np.float16)).name == "reference"


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
    ("numba", numpy_q(np.float16), "takes float32/float64, not float16"),
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

    class StandIn:  # what select returns: something whose load() gives the function
        def load(self):
            return lambda *args, **kw: calls.append((args, kw)) or "result"

    monkeypatch.setattr(dla_backends, "select",
                        lambda q, backend=None: calls.append(("select", backend)) or StandIn())
    q = numpy_q()
    assert dla_backends.dla(q, q, q, q, backend="reference", tau=0.5, capacity=2) == "result"
    assert calls[0] == ("select", "reference")
    assert calls[1][0] == (q, q, q, q) and calls[1][1] == dict(tau=0.5, capacity=2)


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
