"""The registry: per operation, the reference and every native implementation.

An implementation is recorded by name with what it accepts (array namespace,
devices, dtypes), how to load it (a "module:function" path, imported only when
used, so that optional packages load lazily) and how to tell whether it can run
here (an availability test returning a reason when it cannot).

Every implementation of the operation "dla" has the signature and result of
``dla_ref.dla`` and returns arrays of its input's namespace and device.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from collections.abc import Callable


@dataclass(frozen=True)
class Implementation:
    """One implementation of one operation.

    name        unique within the operation ("reference", "numba", "torch", ...)
    namespaces  array namespaces it takes natively, as array_api_compat names them
                ("numpy", "torch", "array_api_strict", "cupy")
    devices     "cpu" and/or "cuda"
    dtypes      input dtypes it accepts ("float16", "bfloat16", "float32", "float64")
    state_dtype the dtype it keeps the state in, which sets its tolerance (None = the
                input's dtype, float32 for float16/bfloat16 inputs, whose range and
                precision are too small for a state; see ``state_dtype_for``)
    loader      "module:function", imported on first use
    available   () -> (ok, reason): can it run on this machine?
    """

    name: str
    namespaces: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    loader: str
    available: Callable[[], tuple[bool, str]] = field(default=lambda: (True, ""))
    state_dtype: str | None = None

    def state_dtype_for(self, input_dtype: str) -> str:
        """The dtype of S, info and scores for inputs of ``input_dtype`` (a name)."""
        if self.state_dtype is not None:
            return self.state_dtype
        return "float32" if input_dtype in ("float16", "bfloat16") else input_dtype

    def load(self) -> Callable:
        module, _, attr = self.loader.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(operation: str, impl: Implementation) -> Implementation:
    """Record ``impl`` for ``operation``; a second record under the same name is an error."""
    table = _REGISTRY.setdefault(operation, {})
    if impl.name in table:
        raise ValueError(f"{operation!r} already has an implementation named {impl.name!r}")
    table[impl.name] = impl
    return impl


def implementations(operation: str = "dla") -> dict[str, Implementation]:
    """All implementations of an operation, by name, in registration order."""
    if operation not in _REGISTRY:
        raise KeyError(f"no operation {operation!r}; known: {sorted(_REGISTRY)}")
    return dict(_REGISTRY[operation])


def get(name: str, operation: str = "dla") -> Implementation:
    """The implementation called ``name``; an unknown name is a ValueError listing the known ones."""
    table = implementations(operation)
    if name not in table:
        raise ValueError(f"unknown backend {name!r} for {operation!r}; known: {list(table)}")
    return table[name]


def package_available(*packages: str) -> Callable[[], tuple[bool, str]]:
    """An availability test: all of ``packages`` can be imported (checked without importing)."""

    def test() -> tuple[bool, str]:
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            return False, f"not installed: {', '.join(missing)}"
        return True, ""

    return test
