"""Array namespaces: which one the inputs use, the dtype to compute in, moving between them.

The reference runs in the namespace of its inputs (NumPy, array_api_strict, torch, ...).
Records that come with the inputs (a trace, an initial cache) may come from another
namespace, say a torch backend's trace checked against NumPy inputs: ``to_namespace``
is the one helper that converts them. The page: docs/spec/trace.md.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj, to_device

__all__ = ["array_namespace", "compute_dtype", "device", "is_array", "namespace_name",
           "to_host", "to_namespace"]


def compute_dtype(xp, dtype):
    """The floating dtype to compute in: float64 (the oracle) unless one is given."""
    if dtype is None:
        return xp.float64
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
    return dtype


def is_array(x) -> bool:
    """Is ``x`` an array of a namespace that array-api-compat supports?"""
    return is_array_api_obj(x)


def namespace_name(x) -> str:
    """The namespace of an array, for messages: "numpy", "torch", "array_api_strict", ..."""
    return array_namespace(x).__name__.split(".")[-1]


def to_host(x):
    """A NumPy array of the values of ``x`` (any namespace; torch detached, on the CPU)."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
    if hasattr(x, "get"):  # CuPy
        return x.get()
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError):  # array_api_strict has no __array__
        return np.from_dlpack(x)


def to_namespace(xp, dev, x):
    """``x`` (an array or a record of arrays: Trace, Cache) as arrays of ``xp`` on ``dev``.

    Arrays already there are returned as they are; arrays of another namespace go
    through the host, arrays on another device are moved. Anything that is not an
    array (None, a string, a wrong type) is returned as it is, for the checks to name.
    """
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple record
        return type(x)(*(to_namespace(xp, dev, y) for y in x))
    if not is_array(x):
        return x
    if array_namespace(x) is not xp:
        return xp.asarray(to_host(x), device=dev)
    return x if device(x) == dev else to_device(x, dev)
