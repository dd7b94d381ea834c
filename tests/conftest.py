"""The backend fixture and the Hypothesis profiles of the whole test suite.

``backend``: every test that asks for it runs once per name in the environment
variable DLA_BACKENDS, a comma list of ``dla_backends.testing.BACKENDS`` names written
NAME[/NAMESPACE][@DEVICE][:DTYPE]: a registry name, the namespace it is fed when not its
first (reference/torch, reference/array_api_strict), device cpu or cuda for torch-based
ones, input dtype (float64 by default where accepted), e.g.

    DLA_BACKENDS=triton@cuda,torch@cuda,torch-chunked@cuda,cupy,torch@cuda:float16 pytest tests
    DLA_BACKENDS=reference,reference:float32,reference/torch pytest tests/test_differential.py

Unset, it is every backend that can run on a CPU. An unknown name stops the run with
the list of known ones; one that cannot run here (not installed, no GPU, module not
written yet) is skipped with the reason, which ``pytest -ra`` shows in the summary.

Hypothesis profiles: "ci" (derandomized, the default) and "dev" (random, more
examples), picked by HYPOTHESIS_PROFILE. ``examples`` is the number of Hypothesis
examples a differential test runs for the current backend: the profile's, scaled
down for backends that are slow here (interpreted Triton).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from dla_backends import testing

# Before any test module imports triton (importing dla_backends.testing does not):
# without CUDA, the Triton kernels run in the interpreter.
testing.interpret_triton_without_cuda()

testing.load_hypothesis_profile()

# Every test backend that can run on a CPU, in registry order (testing.BACKENDS is derived
# from the registry): reference, reference/array_api_strict, reference/torch, numba, ...
CPU_BACKENDS = tuple(name for name in testing.BACKENDS if "cpu" in testing.backend_devices(name))

# Share of the profile's examples a backend (NAME@DEVICE) runs: the interpreted Triton
# kernels take seconds per case on a CPU, so they get fewer. On CUDA all run in full.
EXAMPLE_SHARE = {"triton@cpu": 0.25, "triton-chunked@cpu": 0.25}


def backend_names() -> list[str]:
    names = os.environ.get("DLA_BACKENDS", "")
    return [n.strip() for n in names.split(",") if n.strip()] or list(CPU_BACKENDS)


def pytest_configure(config):
    for name in backend_names():
        try:
            testing.get_backend(name)
        except ValueError as exc:
            raise pytest.UsageError(f"DLA_BACKENDS: {exc}") from None


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and "backend" not in own_parameters(metafunc):
        metafunc.parametrize("backend", backend_names(), indirect=True)


def own_parameters(metafunc) -> set[str]:
    """Names a test parametrizes itself (a test may use "backend" for its own values)."""
    names = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0]
        names.update(n.strip() for n in (argnames.split(",") if isinstance(argnames, str)
                                         else argnames))
    return names


@pytest.fixture
def backend(request) -> testing.Candidate:
    """The candidate for one DLA_BACKENDS name; skipped if it cannot run here."""
    ok, why = testing.availability(request.param)
    if not ok:
        pytest.skip(f"backend {request.param} unavailable: {why}")
    return testing.get_backend(request.param)


@pytest.fixture
def examples(backend) -> int:
    """Hypothesis examples per differential test for this backend (at least 1)."""
    share = EXAMPLE_SHARE.get(backend.label.partition(":")[0], 1.0)
    return max(1, round(settings().max_examples * share))
