"""dla_backends: fast implementations of DLA that are checked against ``dla_ref``.

    import dla_backends
    result = dla_backends.dla(q, k, v, lam, capacity=30, tau=0.6)   # same as dla_ref.dla

``dla`` finds the namespace of its arrays (array-api-compat), runs the first native
implementation that is available for that namespace, device and dtype, and falls
back to the reference. ``backend="name"`` picks one explicitly. Importing this
package needs only numpy and array-api-compat; torch, numba, triton and cupy are
imported when an implementation that needs them is first used.
"""

from __future__ import annotations

import os

import array_api_compat

from .registry import Implementation, get, implementations, package_available, register

__all__ = ["Implementation", "dla", "describe", "get", "implementations", "register",
           "select"]


def _torch_device_available(device):
    def test():
        ok, why = package_available("torch")()
        if not ok:
            return ok, why
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""
    return test


def _triton_available():
    ok, why = package_available("torch", "triton")()
    if not ok:
        return ok, why
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"


def _cupy_available():
    ok, why = package_available("cupy")()
    if not ok:
        return ok, why
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return True, ""
    except Exception as exc:  # cupy raises its own CUDA errors without a driver
        return False, f"no CUDA device ({type(exc).__name__}: {exc})"
    return False, "no CUDA device"


ALL_FLOATS = ("float16", "bfloat16", "float32", "float64")

# The reference first: it runs on every namespace and is what the others are checked against.
register("dla", Implementation(
    "reference", ("numpy", "array_api_strict", "torch", "cupy"), ("cpu", "cuda"),
    ALL_FLOATS, "dla_ref:dla", state_dtype="float64"))
register("dla", Implementation(
    "numba", ("numpy",), ("cpu",), ("float32", "float64"),
    "dla_backends.kernels.numba_scan:dla", package_available("numba")))
register("dla", Implementation(
    "torch", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.torch_scan:dla", _torch_device_available("cpu")))
register("dla", Implementation(
    "torch-chunked", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.torch_chunked:dla", _torch_device_available("cpu")))
register("dla", Implementation(
    "triton", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.triton_kernels:dla", _triton_available, state_dtype="float32"))
register("dla", Implementation(
    "cuda-model", ("numpy",), ("cpu",), ("float32", "float64"),
    "dla_backends.kernels.cuda_model:dla"))
register("dla", Implementation(
    "cupy", ("cupy",), ("cuda",), ("float32", "float64"),
    "dla_backends.kernels.cupy_kernels:dla", _cupy_available, state_dtype="float32"))

# Which native implementation ``dla`` prefers, per (namespace, device).
PREFERENCE = {
    ("numpy", "cpu"): ("numba",),
    ("torch", "cpu"): ("torch",),
    ("torch", "cuda"): ("triton", "torch"),
    ("cupy", "cuda"): ("cupy",),
}


def describe(x) -> tuple[str, str, str]:
    """(namespace, device, dtype) of an array, as the registry names them."""
    xp = array_api_compat.array_namespace(x)
    namespace = xp.__name__.split(".")[-1]  # array_api_compat.torch -> torch
    device = str(array_api_compat.device(x)).lower()  # torch "cuda:0", cupy "<CUDA Device 0>"
    device = "cuda" if ("cuda" in device or "gpu" in device) else "cpu"
    dtype = str(x.dtype).split(".")[-1]
    return namespace, device, dtype


def accepts(impl: Implementation, namespace: str, device: str, dtype: str) -> str:
    """Why ``impl`` cannot take such an array ("" if it can)."""
    if namespace not in impl.namespaces:
        return f"takes {'/'.join(impl.namespaces)} arrays, not {namespace}"
    if device not in impl.devices:
        return f"runs on {'/'.join(impl.devices)}, not {device}"
    if dtype not in impl.dtypes:
        return f"takes {'/'.join(impl.dtypes)}, not {dtype}"
    return ""


def select(q, backend: str | None = None, operation: str = "dla") -> Implementation:
    """The implementation ``dla`` would run for arrays like ``q``.

    With ``backend`` given, that one (ValueError if unknown or unable to take q,
    RuntimeError if unavailable here). Otherwise the first available preferred
    native implementation for q's namespace and device, else the reference.
    """
    namespace, device, dtype = describe(q)
    if backend is not None:
        impl = get(backend, operation)
        why = accepts(impl, namespace, device, dtype)
        if why:
            raise ValueError(f"backend {backend!r} {why}")
        ok, why = impl.available()
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available here: {why}")
        return impl
    for name in PREFERENCE.get((namespace, device), ()):
        impl = get(name, operation)
        if not accepts(impl, namespace, device, dtype) and impl.available()[0]:
            return impl
    return get("reference", operation)


def dla(q, k, v, lam, *, backend: str | None = None, **options):
    """``dla_ref.dla`` on the fastest checked implementation for these arrays.

    Same arguments and result as ``dla_ref.dla``; ``backend`` names one explicitly
    (see ``implementations()``).
    """
    return select(q, backend).load()(q, k, v, lam, **options)
