"""The test backends: a name -> the implementation under test and the arrays it is fed.

A test backend is named NAME[/NAMESPACE][@DEVICE][:DTYPE], where NAME is a registry name
(``dla_backends.implementations()``: "reference", "numba", "torch", ...), NAMESPACE one of
the other array namespaces that implementation takes ("reference/torch" runs the
reference on torch tensors; none: its first), DEVICE "cpu" or "cuda" (none: the first
the namespace runs on) and DTYPE the input dtype (none: float64 where accepted, else
float32). ``BACKENDS`` is derived from the registry, so a registered implementation is a
test backend without further ado.

A ``Candidate`` is what the checks run: a registry implementation (``get_backend``), the
reference in a lower precision (``reference_candidate``) or any callable with the dla
signature (``candidate_for``). See docs/testing-your-kernel.md.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import dla_ref

from .. import describe, registry

# The devices an array namespace lives on, and the floating dtypes it has (NumPy and
# CuPy have no bfloat16, array_api_strict has neither half precision).
NAMESPACE_DEVICES = {"numpy": ("cpu",), "array_api_strict": ("cpu",), "torch": ("cpu", "cuda"),
                     "cupy": ("cuda",)}
NAMESPACE_DTYPES = {"numpy": ("float16", "float32", "float64"),
                    "array_api_strict": ("float32", "float64"),
                    "torch": ("float16", "bfloat16", "float32", "float64"),
                    "cupy": ("float16", "float32", "float64")}


def backend_table() -> dict[str, tuple[str, str]]:
    """Every test backend name -> (registry name, namespace), in registry order.

    An implementation's first namespace goes by its registry name alone, each further
    one by "NAME/NAMESPACE" ("reference/array_api_strict", "reference/torch").
    """
    table = {}
    for impl in registry.implementations("dla").values():
        for number, namespace in enumerate(impl.namespaces):
            table[f"{impl.name}/{namespace}" if number else impl.name] = (impl.name, namespace)
    return table


BACKENDS = backend_table()


def backend_devices(name: str) -> tuple[str, ...]:
    """The devices test backend ``name`` (a BACKENDS key) can run on; the first is its default."""
    implementation, namespace = BACKENDS[name]
    devices = registry.get(implementation).devices
    return tuple(d for d in NAMESPACE_DEVICES[namespace] if d in devices)


def backend_dtypes(name: str) -> tuple[str, ...]:
    """The input dtypes test backend ``name`` (a BACKENDS key) takes: its implementation's
    that its namespace has."""
    implementation, namespace = BACKENDS[name]
    return tuple(d for d in registry.get(implementation).dtypes
                 if d in NAMESPACE_DTYPES[namespace])


@dataclass(frozen=True)
class Candidate:
    """An implementation under test and the arrays it is fed.

    label           how reports name it ("torch@cuda:float32", "mymodule:my_dla")
    load            () -> the callable, with the signature and result of ``dla_ref.dla``
    namespace       array namespace of its inputs and outputs, as ``describe`` names it
    device          "cpu" or "cuda"
    dtype           the floating dtype of the inputs it is given ("float64", "float32", ...)
    state_dtype     the dtype of its cache S, info and trace scores; None = not declared
                    (then it is read from the result and not checked)
    rebuild         a Python expression that rebuilds this candidate in a reproducer
    imports         the line(s) that expression needs first ("" if none)
    implementation  its registry name, None for a callable outside the registry
    """

    label: str
    load: Callable[[], Callable]
    namespace: str
    device: str
    dtype: str
    state_dtype: str | None
    rebuild: str
    imports: str = ""
    implementation: str | None = None


def get_backend(name: str) -> Candidate:
    """The candidate for a test backend name ("reference", "triton@cuda:float16", ...).

    Its inputs are of the named dtype, else float64 where the implementation accepts
    float64, else float32; its state dtype is the registry's (``state_dtype_for``). An
    unknown name, a device the backend cannot run on or a dtype its implementation does
    not take is a ValueError that lists what is known.
    """
    rest, _, dtype = name.partition(":")
    base, _, device = rest.partition("@")
    if base not in BACKENDS:
        raise ValueError(f"unknown test backend {name!r}; known: {', '.join(BACKENDS)} (written "
                         "NAME[/NAMESPACE][@DEVICE][:DTYPE], e.g. triton@cuda:float16)")
    implementation, namespace = BACKENDS[base]
    impl = registry.get(implementation)
    devices = backend_devices(base)
    device = device or devices[0]
    if device not in devices:
        raise ValueError(f"test backend {base!r} runs on {'/'.join(devices)}, not {device!r} "
                         f"(in {name!r})")
    dtypes = backend_dtypes(base)
    if dtype and dtype not in dtypes:
        raise ValueError(f"test backend {base!r} takes {'/'.join(dtypes)}, not {dtype!r} "
                         f"(in {name!r})")
    dtype = dtype or ("float64" if "float64" in dtypes else "float32")
    return Candidate(label=f"{base}@{device}:{dtype}", load=impl.load, namespace=namespace,
                     device=device, dtype=dtype, state_dtype=impl.state_dtype_for(dtype),
                     rebuild=f"get_backend({name!r})", implementation=implementation)


def availability(name: str) -> tuple[bool, str]:
    """(True, "") if test backend ``name`` can run here, else (False, why).

    Checks, in order: the array package of its namespace, the device, the registry's
    availability test, and that the implementation's module exists (it may not be
    written yet). An unknown name is a ValueError, not an unavailability.
    """
    candidate = get_backend(name)
    if importlib.util.find_spec(candidate.namespace) is None:
        return False, f"not installed: {candidate.namespace}"
    if candidate.device == "cuda" and not cuda_available(candidate.namespace):
        return False, "no CUDA device"
    impl = registry.get(candidate.implementation)
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
