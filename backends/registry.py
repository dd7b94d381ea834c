"""The registry: per operation, the reference and every native implementation.

An implementation is recorded by name with what it accepts (array namespace, devices,
dtypes, backbones), whether autograd records through it, how to load it (a
"module:function" path, imported only when used, so that optional packages load lazily)
and how to tell whether it can run here (an availability test returning a reason when it
cannot). Operations: "dla" (the signature and result of ``dla_ref.dla``) and "loglinear"
(those of ``dla_ref.loglinear``); every implementation returns arrays of its input's
namespace and device.

Which implementation the dispatch prefers is recorded here too, per operation and
(namespace, device), with a separate table for torch inputs that require grad while grad
mode is on. Only implementations declared with ``gradients=True`` are taken from it, and
when none of them is available the reference (differentiable on torch tensors) runs. To
route requires-grad CPU torch inputs to a compiled autograd path, register it and put it
first (one line each, where the backends are registered, in ``dla_backends/__init__.py``):

    register("dla", Implementation("numba-autograd", ("torch",), ("cpu",),
                                   ("float32", "float64"), "dla_backends.autograd:dla",
                                   package_available("numba", "torch"), gradients=True))
    prefer("dla", "torch", "cpu", ("numba-autograd", "torch"), requires_grad=True)
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from dla_ref import BACKBONES


@dataclass(frozen=True)
class Implementation:
    """One implementation of one operation.

    name        unique within the operation ("reference", "numba", "torch", ...)
    namespaces  array namespaces it takes natively, as array_api_compat names them
                ("numpy", "torch", "array_api_strict", "cupy")
    devices     "cpu" and/or "cuda"
    dtypes      input dtypes it takes natively ("float16", "bfloat16", "float32", "float64")
    loader      "module:function", imported on first use
    available   () -> (ok, reason): can it run on this machine?
    state_dtype the dtype it keeps the state in, which sets its tolerance (None = the
                input's dtype, float32 for float16/bfloat16 inputs, whose range and
                precision are too small for a state; see ``state_dtype_for``)
    backbones   the backbones it computes (the others raise NotImplementedError there)
    gradients   True if autograd records through it: its outputs carry gradients back to
                torch inputs that require grad (see the module docstring)
    via_float32 input dtypes it takes only through the dispatch, which casts the inputs
                to float32 (and o back): ("float16",) for a kernel that computes in
                float32 or float64 only
    score_scalars how it obtains ||S_open||^2 and <S_open, s_t> for a score: "direct"
                (summed from the open state, as dla_ref.step.score_error_bound assumes) or
                "recurrent" (||alpha (B + s)||^2 = alpha^2 (||B||^2 + 2 <B, s> + ||s||^2)
                over the open block, the dot from prefix sums: the kit's budget adds their
                rounding, testing/budgets.py)
    """

    name: str
    namespaces: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    loader: str
    available: Callable[[], tuple[bool, str]] = field(default=lambda: (True, ""))
    state_dtype: str | None = None
    backbones: tuple[str, ...] = BACKBONES
    gradients: bool = False
    via_float32: tuple[str, ...] = ()
    score_scalars: str = "direct"

    def state_dtype_for(self, input_dtype: str) -> str:
        """The dtype of S, info and scores for inputs of ``input_dtype`` (a name)."""
        if self.state_dtype is not None:
            return self.state_dtype
        return "float32" if input_dtype in ("float16", "bfloat16") else input_dtype

    def can_compute_in(self, input_dtype: str, dtype: str) -> bool:
        """Can it keep the state in ``dtype`` (dla's ``dtype=``) for inputs of
        ``input_dtype``? Its own state dtype, or any dtype it takes if that follows the
        input."""
        return dtype == self.state_dtype_for(input_dtype) or (
            self.state_dtype is None and dtype in self.dtypes)

    def load(self) -> Callable:
        module, _, attr = self.loader.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_PREFERENCES: dict[tuple[str, bool], dict[tuple[str, str], tuple[str, ...]]] = {}


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
    """The implementation called ``name``; an unknown name is a ValueError listing the known
    ones."""
    table = implementations(operation)
    if name not in table:
        raise ValueError(f"unknown backend {name!r} for {operation!r}; known: {list(table)}")
    return table[name]


def prefer(operation: str, namespace: str, device: str, names: tuple[str, ...], *,
           requires_grad: bool = False) -> None:
    """Try ``names`` in order (then the reference) for arrays of that namespace and device.

    requires_grad=True sets the table for torch inputs that require grad while grad mode
    is on; the dispatch skips there every implementation without ``gradients``.
    """
    table = implementations(operation)
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown} for {operation!r}; known: {list(table)}")
    preferences(operation, requires_grad=requires_grad)[(namespace, device)] = tuple(names)


def preferences(operation: str = "dla", *, requires_grad: bool = False
                ) -> dict[tuple[str, str], tuple[str, ...]]:
    """The live table (namespace, device) -> preferred implementation names."""
    return _PREFERENCES.setdefault((operation, requires_grad), {})


def package_available(*packages: str) -> Callable[[], tuple[bool, str]]:
    """An availability test: all of ``packages`` can be imported (checked without importing)."""

    def test() -> tuple[bool, str]:
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            return False, f"not installed: {', '.join(missing)}"
        return True, ""

    return test
