"""The array namespace of the inputs, and the dtype the reference computes in."""

from __future__ import annotations

from array_api_compat import array_namespace, device

__all__ = ["array_namespace", "compute_dtype", "device"]


def compute_dtype(xp, dtype):
    """The floating dtype to compute in: float64 (the oracle) unless one is given."""
    if dtype is None:
        return xp.float64
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
    return dtype
