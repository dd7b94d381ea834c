"""Arrays between the kit's NumPy float64 cases and a candidate's namespace, device and dtype.

``to_native`` makes a candidate's input from a NumPy array, ``to_numpy`` / ``widened`` bring
its output back for comparison, ``noncontiguous`` gives strided views of the same values.
torch, cupy and array_api_strict are imported only when an array of theirs is made.
"""

from __future__ import annotations

import importlib

import numpy as np

from dla_ref.admissibility import to_host

from .. import describe


def to_native(x: np.ndarray, namespace: str, device: str, dtype: str | None = None):
    """A NumPy array as an array of ``namespace`` on ``device``.

    Floating arrays are cast to ``dtype`` (a name such as "float32"); integer and
    bool arrays keep their dtype.
    """
    if dtype is None or not np.issubdtype(x.dtype, np.floating):
        dtype = x.dtype.name
    if namespace == "numpy":
        with np.errstate(over="ignore"):  # Case.as_given_to reports values that overflow
            return np.array(x, dtype=dtype)
    if namespace == "array_api_strict":
        import array_api_strict as xps

        return xps.asarray(np.ascontiguousarray(x), dtype=getattr(xps, dtype))
    if namespace == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device,
                                                             dtype=getattr(torch, dtype))
    if namespace == "cupy":
        import cupy

        return cupy.asarray(x, dtype=dtype)
    raise ValueError(f"no conversion to namespace {namespace!r}")


def to_numpy(x) -> np.ndarray:
    """Any namespace's array as a NumPy array (bfloat16 widened to float32)."""
    if describe(x)[0] == "cupy":
        import cupy

        return cupy.asnumpy(x)
    if hasattr(x, "detach") and str(x.dtype) == "torch.bfloat16":
        x = x.float()
    return np.asarray(to_host(x))


def widened(x) -> np.ndarray | None:
    """Any namespace's array as NumPy, floating dtypes widened to float64 (None stays None)."""
    if x is None:
        return None
    x = to_numpy(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x


def widened_record(record):
    """``widened`` applied to every field of a Trace or Cache (None stays None)."""
    return None if record is None else type(record)(*(widened(x) for x in record))


def noncontiguous(x):
    """The same values as a strided, transposed view (NumPy, CuPy and torch).

    The values are laid out with every axis reversed and every element doubled
    along the last axis, then viewed back in the original order and every other
    element taken: no axis has the natural stride. array_api_strict has no strides,
    so its arrays come back as they are.
    """
    namespace = describe(x)[0]
    if namespace in ("numpy", "cupy"):
        xp = np if namespace == "numpy" else importlib.import_module("cupy")
        return xp.ascontiguousarray(xp.repeat(x, 2, axis=-1).T).T[..., ::2]
    if namespace == "torch":
        axes = tuple(range(x.ndim))[::-1]
        doubled = x.repeat_interleave(2, dim=-1)
        return doubled.permute(axes).contiguous().permute(axes)[..., ::2]
    return x
