"""dla_backends: fast implementations of DLA that are checked against ``dla_ref``.

    import dla_backends
    result = dla_backends.dla(q, k, v, lam, capacity=30, tau=0.6)   # same as dla_ref.dla
    o = dla_backends.loglinear(q, k, v, levels)                      # same as dla_ref.loglinear
    decoder = dla_backends.Decoder(capacity=30, tau=0.6)             # token by token
    o = decoder.prefill(q, k, v, lam); o_t = decoder.step(q_t, k_t, v_t, lam_t)

``dla`` and ``loglinear`` find the namespace of their arrays (array-api-compat), run the
first native implementation that is available for that namespace, device, dtype and
backbone, and fall back to the reference; ``backend="name"`` picks one explicitly. The
registrations and preferences are below, the rules in ``registry``. Every result has the
dtype policy of ``dla_ref``: o in the inputs' result dtype, the cache and the scores in
the implementation's state dtype (``Implementation.state_dtype_for``). Importing this
package needs only numpy and array-api-compat; torch, numba, triton and cupy are
imported when an implementation that needs them is first used. The backend table:
docs/backends.md.
"""

from __future__ import annotations

import numbers
import os

import array_api_compat

import dla_ref

from dla_ref._xp import to_namespace
from dla_ref.validation import inputs_namespace

from . import host
from .registry import (Implementation, get, implementations, package_available, prefer,
                       preferences, register)

__all__ = ["PREFERENCE", "Decoder", "Implementation", "describe", "dla", "get",
           "implementations", "loglinear", "prefer", "register", "select"]


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
CHUNKED_BACKBONES = ("linear", "mamba2")  # gdn's transition has no chunked form here

# The reference first: it runs on every namespace and is what the others are checked against.
register("dla", Implementation(
    "reference", ("numpy", "array_api_strict", "torch", "cupy"), ("cpu", "cuda"),
    ALL_FLOATS, "dla_ref:dla", state_dtype="float64", gradients=True))
register("dla", Implementation(
    "numba", ("numpy",), ("cpu",), ("float32", "float64"),
    "dla_backends.kernels.numba_scan:dla", package_available("numba"),
    via_float32=("float16",)))
register("dla", Implementation(
    "torch", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.torch_scan:dla", _torch_device_available("cpu"), gradients=True))
register("dla", Implementation(
    "torch-chunked", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.torch_chunked:dla", _torch_device_available("cpu"),
    backbones=CHUNKED_BACKBONES, gradients=True, score_scalars="recurrent"))
register("dla", Implementation(
    "triton", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.triton_kernels:dla", _triton_available, state_dtype="float32"))
register("dla", Implementation(
    "triton-chunked", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.triton_chunked:dla", _triton_available, state_dtype="float32",
    backbones=CHUNKED_BACKBONES))
register("dla", Implementation(
    "cuda-model", ("numpy",), ("cpu",), ("float32", "float64"),
    "dla_backends.kernels.cuda_model:dla"))
register("dla", Implementation(
    "cupy", ("cupy",), ("cuda",), ("float32", "float64"),
    "dla_backends.kernels.cupy_kernels:dla", _cupy_available, state_dtype="float32"))
register("dla", Implementation(
    "numba-autograd", ("torch",), ("cpu",), ("float32", "float64"), "dla_backends.autograd:dla",
    package_available("numba", "torch"), gradients=True))

register("loglinear", Implementation(
    "reference", ("numpy", "array_api_strict", "torch", "cupy"), ("cpu", "cuda"),
    ALL_FLOATS, "dla_ref:loglinear", state_dtype="float64", gradients=True))
register("loglinear", Implementation(
    "torch-chunked", ("torch",), ("cpu", "cuda"), ALL_FLOATS,
    "dla_backends.kernels.torch_chunked:loglinear", _torch_device_available("cpu"),
    backbones=CHUNKED_BACKBONES, gradients=True))

# Which native implementations are tried first, per (namespace, device); then the reference.
prefer("dla", "numpy", "cpu", ("numba",))
prefer("dla", "torch", "cpu", ("torch",))
prefer("dla", "torch", "cuda", ("triton", "torch"))
prefer("dla", "cupy", "cuda", ("cupy",))
prefer("dla", "torch", "cpu", ("numba-autograd", "torch"), requires_grad=True)
prefer("dla", "torch", "cuda", ("torch",), requires_grad=True)
prefer("loglinear", "torch", "cpu", ("torch-chunked",))
prefer("loglinear", "torch", "cuda", ("torch-chunked",))
PREFERENCE = preferences("dla")  # the table for "dla", as docs/backends.md shows it


def describe(x) -> tuple[str, str, str]:
    """(namespace, device, dtype) of an array, as the registry names them."""
    xp = array_api_compat.array_namespace(x)
    namespace = xp.__name__.split(".")[-1]  # array_api_compat.torch -> torch
    device = str(array_api_compat.device(x)).lower()  # torch "cuda:0", cupy "<CUDA Device 0>"
    device = "cuda" if ("cuda" in device or "gpu" in device) else "cpu"
    dtype = str(x.dtype).split(".")[-1]
    return namespace, device, dtype


def accepts(impl: Implementation, namespace: str, device: str, dtype: str,
            backbone: str | None = None, requires_grad: bool = False,
            compute: str | None = None) -> str:
    """Why ``impl`` cannot take such arrays ("" if it can).

    compute: the requested computing (state) dtype, dla's ``dtype=``, as a name.
    """
    if namespace not in impl.namespaces:
        return f"takes {'/'.join(impl.namespaces)} arrays, not {namespace}"
    if device not in impl.devices:
        return f"runs on {'/'.join(impl.devices)}, not {device}"
    if dtype not in impl.dtypes + impl.via_float32:
        return f"takes {'/'.join(impl.dtypes)}, not {dtype}"
    if compute is not None and not impl.can_compute_in(dtype, compute):
        return f"computes in {impl.state_dtype_for(dtype)} for {dtype} inputs, not {compute}"
    if backbone in dla_ref.BACKBONES and backbone not in impl.backbones:
        return f"computes backbone {'/'.join(impl.backbones)}, not {backbone!r}"
    if requires_grad and not impl.gradients:
        return "provides no gradients, and the inputs require grad"
    return ""


def select(q, backend: str | None = None, operation: str = "dla", *,
           backbone: str | None = None, requires_grad: bool = False,
           compute: str | None = None) -> Implementation:
    """The implementation ``operation`` would run for arrays like ``q``.

    With ``backend`` given, that one (ValueError if unknown or unable to take q,
    RuntimeError if unavailable here). Otherwise the first available preferred native
    implementation for q's namespace and device (from the requires-grad table when
    ``requires_grad``) that takes q's dtype, ``backbone`` and the computing dtype
    ``compute``, else the reference.
    """
    namespace, device, dtype = describe(q)
    if backend is not None:
        impl = get(backend, operation)
        why = accepts(impl, namespace, device, dtype, backbone, requires_grad, compute)
        if why:
            raise ValueError(f"backend {backend!r} {why}")
        ok, why = impl.available()
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available here: {why}")
        return impl
    table = preferences(operation, requires_grad=requires_grad)
    for name in table.get((namespace, device), ()):
        impl = get(name, operation)
        if not accepts(impl, namespace, device, dtype, backbone, requires_grad, compute) \
                and impl.available()[0]:
            return impl
    return get("reference", operation)


_OPTIONS = dla_ref.Options()  # the defaults, from one place


def dla(q, k, v, lam=None, *, backbone=_OPTIONS.backbone, log_alpha=None, beta=None,
        tau=_OPTIONS.tau, capacity=_OPTIONS.capacity, score=_OPTIONS.score,
        normalize=_OPTIONS.normalize, slots=_OPTIONS.slots, eps=_OPTIONS.eps, trace=None,
        initial_cache=None, dtype=None, backend: str | None = None):
    """``dla_ref.dla`` on the fastest checked implementation for these arrays.

    The arguments and result of ``dla_ref.dla`` (see there); ``backend`` names an
    implementation explicitly (see ``implementations()``). ``dtype`` is the computing
    dtype: the reference computes in it (float64 by default), a native implementation
    is given inputs of that dtype. The result's ``backend`` names what ran.
    """
    arrays = dict(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
    records = dict(trace=trace, initial_cache=initial_cache)
    options = dict(backbone=backbone, tau=tau, capacity=capacity, score=score,
                   normalize=normalize, slots=slots, eps=eps)
    return run("dla", arrays, records, options, dtype, backend)


def loglinear(q, k, v, lam=None, *, backbone="linear", log_alpha=None, beta=None, dtype=None,
              backend: str | None = None):
    """``dla_ref.loglinear`` (Log-Linear Attention, the Fenwick partition) dispatched like
    ``dla``: torch-chunked for torch tensors (linear and mamba2), else the reference.

    lam [B, T, H, L] holds one readout weight per Fenwick level. Returns o [B, T, H, Dv]
    in the inputs' result dtype.
    """
    arrays = dict(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
    return run("loglinear", arrays, {}, dict(backbone=backbone), dtype, backend)


# --- the steps every dispatched call takes ------------------------------------------------


def run(operation, arrays, records, options, dtype, backend):
    """Check the arrays, fill lam, select an implementation, call it, finish the result.

    arrays: q, k, v, lam, log_alpha, beta by name (None where not given); records: trace,
    initial_cache; options: the scalar options; dtype: the computing dtype (None: the
    implementation's own); backend: an implementation name or None.
    """
    arrays, records = check_arrays(arrays, records)
    xp = array_api_compat.array_namespace(arrays["q"])
    out_dtype = xp.result_type(*(arrays[name] for name in ("q", "k", "v", "lam")
                                 if arrays[name] is not None))
    arrays["lam"] = full_lam(xp, operation, arrays, options)
    impl = select(arrays["q"], backend, operation, backbone=options["backbone"],
                  requires_grad=requires_grad(arrays, records),
                  compute=None if dtype is None else host.dtype_name(dtype))
    if describe(arrays["q"])[2] in impl.via_float32:
        arrays = {name: as_float32(xp, x) for name, x in arrays.items()}
    extra = {} if dtype is None else dict(dtype=dtype)
    result = impl.load()(**arrays, **records, **options, **extra)
    return finish(xp, result, out_dtype, impl)


def check_arrays(arrays, records):
    """The arrays as given and the records in q's namespace and on q's device, or an error
    naming an argument.

    dla_ref's one rule: q, k, v, lam, log_alpha and beta (when given) are arrays of one
    namespace (TypeError naming a non-array, or an array of another namespace and both
    namespaces; checked before anything asks array-api-compat for a namespace, which
    fails without naming an argument) and, here, on one device (ValueError); a trace and
    an initial cache of another namespace or device are converted. Returns (arrays,
    records).
    """
    for name in ("q", "k", "v"):  # the others may be None (not given)
        if arrays[name] is None:
            raise TypeError(f"{name} must be an array (NumPy, torch, CuPy or array API), "
                            "got NoneType")
    xp = inputs_namespace(**arrays)
    dev = array_api_compat.device(arrays["q"])
    for name, x in arrays.items():
        if x is not None and array_api_compat.device(x) != dev:
            raise ValueError(f"{name} is on {describe(x)[1]} but q is on "
                             f"{describe(arrays['q'])[1]}: pass the inputs on one device")
    return arrays, {name: to_namespace(xp, dev, record) for name, record in records.items()}


def full_lam(xp, operation, arrays, options):
    """lam as [B, T, H, columns]: all ones if omitted, else broadcast to that shape.

    columns = the capacity K (dla) or the Fenwick levels of T (loglinear; a given lam
    keeps its own number of columns). A lam that does not broadcast is returned as it
    is, for the implementation's own shape check to name.
    """
    q, lam = arrays["q"], arrays["lam"]
    if q.ndim != 4 or (lam is not None and not 1 <= lam.ndim <= 4):
        return lam
    B, T, H, _ = q.shape
    if operation == "dla":
        columns = options["capacity"]
        if isinstance(columns, bool) or not isinstance(columns, numbers.Integral) \
                or columns < 1:
            return lam  # the options' check names a bad capacity
    else:
        columns = dla_ref.fenwick_levels(T) if lam is None or lam.shape[-1] == 1 \
            else lam.shape[-1]
    shape = (B, T, H, columns)
    if lam is None:
        return xp.ones(shape, dtype=q.dtype, device=array_api_compat.device(q))
    if tuple(lam.shape) == shape:
        return lam
    try:
        return xp.broadcast_to(lam, shape)
    except (ValueError, RuntimeError):  # torch says RuntimeError
        return lam


def as_float32(xp, x):
    """A floating array as float32 (None and other arrays as they are)."""
    if x is None or not xp.isdtype(x.dtype, "real floating"):
        return x
    return xp.astype(x, xp.float32)


def requires_grad(arrays, records) -> bool:
    """Does autograd record through these inputs (torch tensors that require grad, grad
    mode on)?"""
    cache = records.get("initial_cache")
    tensors = list(arrays.values()) + (list(cache) if isinstance(cache, tuple) else [])
    if not any(getattr(x, "requires_grad", False) for x in tensors):
        return False
    import torch

    return torch.is_grad_enabled()


def finish(xp, result, out_dtype, impl):
    """The dtype policy (o in the result dtype of q, k, v and lam) and the name of what
    ran."""
    if not isinstance(result, tuple):  # loglinear: o alone
        return result if result.dtype == out_dtype else xp.astype(result, out_dtype)
    if result.o.dtype != out_dtype:
        result = result._replace(o=xp.astype(result.o, out_dtype))
    # dla_ref.Result's default names the reference: an implementation that left it did not say
    if result.backend == dla_ref.Result._field_defaults["backend"] != impl.name:
        result = result._replace(backend=impl.name)
    return result


def __getattr__(name):
    if name == "Decoder":  # imported on first use, like the implementations
        from .decoder import Decoder

        return Decoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
