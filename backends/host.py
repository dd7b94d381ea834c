"""The host side that every kernel shares: prepare a call, launch it, finish the result.

A kernel module holds its launch code and a thin wrapper around ``run``, the way
flash-linear-attention wraps one ``fused_recurrent`` per method:

    def dla(q, k, v, lam, **options):          # the keywords of dla_ref.dla
        return host.run(launch, q, k, v, lam, backend="numba", **options)

    def launch(call: Call) -> Launched:        # the kernel, on streams [N, T, ...]

``run`` = ``prepare`` (options with dla_ref.Options' defaults, dla_ref's own checks and
namespace rule, the batch as streams, the initial cache, a forced trace checked on the
host, the state dtype by ``Implementation.state_dtype_for``), then ``launch`` (skipped for
an empty batch, B = 0 or H = 0), then ``finish`` (the ``dla_ref.Result`` in the inputs'
namespace and on their device). ``to_host`` (dla_ref's) is the one way to copy an array
to NumPy. See docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace, device

from dla_ref._xp import is_array, namespace_name, to_host, to_namespace
from dla_ref.parallel import partition_history
from dla_ref.records import Options, Result, Trace
from dla_ref.recurrent import (cache_from_streams, cache_to_streams, empty_cache, from_streams,
                               to_streams, tokens_to_streams, trace_to_streams)
from dla_ref.validation import (broadcast_lam, check_cache, check_inputs, check_options,
                                 check_trace_shape, inputs_namespace)

from . import registry

__all__ = ["Call", "Forced", "Launched", "finish", "prepare", "run", "to_host"]

DEFAULTS = Options()
OPTION_NAMES = tuple(f.name for f in fields(Options))
ARRAY_KEYWORDS = ("log_alpha", "beta", "trace", "initial_cache")
RECORDS = ("trace", "initial_cache")  # of any namespace: converted, as dla_ref does
npx = array_namespace(np.zeros(0))  # NumPy as dla_ref's code takes it


class Forced(NamedTuple):
    """A forced trace as streams, on the host (NumPy), checked to fit the initial cache.

    boundary [N, T] bool, merged [N, T] int64.
    """

    boundary: np.ndarray
    merged: np.ndarray


class Call(NamedTuple):
    """One call of a kernel, prepared on the host (``prepare``).

    backend      the registry name of the implementation
    xp, device   the inputs' array namespace (array-api-compat) and device
    opts         the validated ``dla_ref.Options``
    shape        (B, T, H, Dk, Dv); N = B*H streams, stream n = b*H + h
    tokens       ``dla_ref.Tokens`` of streams [N, T, ...] in the state dtype
                 (alpha = exp(log_alpha); None where the backbone has none)
    log_alpha    [N, T] in the state dtype, or None (for kernels that sum log decays)
    cache        (S [N, K, Dk, Dv], n [N, K] int64, info [N, K], m [N] int64): the
                 initial cache, a fresh copy the kernel may write in place
    forced       a ``Forced`` trace (host), or None: the kernel decides
    state_dtype  the dtype of S, info and the scores (an ``xp`` dtype)
    out_dtype    the dtype of o: the token inputs' result dtype
    recording    torch autograd records through this call (some input requires grad)
    """

    backend: str
    xp: Any
    device: Any
    opts: Options
    shape: tuple[int, int, int, int, int]
    tokens: Any
    log_alpha: Any
    cache: tuple
    forced: Forced | None
    state_dtype: Any
    out_dtype: Any
    recording: bool

    @property
    def streams(self) -> tuple[int, int]:
        """(N, T): streams and tokens."""
        B, T, H, _, _ = self.shape
        return B * H, T


class Launched(NamedTuple):
    """What a launch returns, as streams (any namespace: ``finish`` converts).

    o [N, T, Dv]; cache (S, n, info, m) over streams in slot order; trace (scores,
    boundary, merged) [N, T].
    """

    o: Any
    cache: tuple
    trace: tuple


def run(launch, q, k, v, lam=None, *, backend: str, state_dtype=None, **options) -> Result:
    """``dla_ref.dla``'s contract around ``launch(call) -> Launched``.

    backend: the registry name (it sets the namespaces, dtypes and state dtype);
    state_dtype: a dtype name that overrides the registry's rule (kernel tests only);
    options: the keywords of ``dla_ref.dla``.
    """
    call = prepare(q, k, v, lam, backend=backend, state_dtype=state_dtype, **options)
    B, T, H, _, Dv = call.shape
    if B * H == 0:  # nothing to launch: the empty result dla_ref gives
        return finish(call, Launched(call.xp.zeros((0, T, Dv), device=call.device),
                                     call.cache, empty_trace(call.xp, T, call.device)))
    return finish(call, launch(call))


def prepare(q, k, v, lam=None, *, backend: str, state_dtype=None, **options) -> Call:
    """Validate one call and lay it out for a kernel (see ``Call``).

    Errors are dla_ref's own (ValueError / TypeError naming the argument; token inputs of
    two namespaces are a TypeError, a trace or cache of another namespace is converted),
    plus a TypeError for an unknown keyword, for q of a namespace the backend does not
    take and for inputs of a dtype it does not take, and NotImplementedError for a
    backbone it does not compute.
    """
    impl = registry.get(backend)
    opts = options_record(options)
    log_alpha, beta = options.get("log_alpha"), options.get("beta")
    for name, x in (("q", q), ("k", k), ("v", v)):  # the ones that may not be None
        if not is_array(x):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    xp = inputs_namespace(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
    check_backend_takes(impl, q, opts.backbone)
    dev = device(q)
    trace, initial_cache = (to_namespace(xp, dev, options.get(name)) for name in RECORDS)
    B, T, H, Dk, Dv = check_inputs(xp, q, k, v, lam, log_alpha, beta, opts.backbone,
                                   lam_columns=opts.capacity)
    lam = broadcast_lam(xp, lam, (B, T, H, opts.capacity), q)  # None: ones; [H, K], ...
    arrays = [x for x in (q, k, v, lam, log_alpha, beta) if x is not None]
    out_dtype, ftype = dtypes(xp, impl, arrays, options.get("dtype"), state_dtype)
    cache = initial_state(xp, dev, initial_cache, opts.capacity, (B, H, Dk, Dv), ftype)
    forced = None if trace is None else forced_trace(xp, trace, cache, opts.capacity,
                                                     (B, T, H))
    return Call(backend, xp, dev, opts, (B, T, H, Dk, Dv),
                tokens_to_streams(xp, ftype, q, k, v, lam, log_alpha, beta),
                None if log_alpha is None else to_streams(xp, xp.astype(log_alpha, ftype)),
                cache, forced, ftype, out_dtype,
                recording(arrays + ([] if initial_cache is None else [initial_cache.S])))


def finish(call: Call, launched: Launched) -> Result:
    """The ``dla_ref.Result`` [B, T, H, ...] of a launch, in the inputs' namespace and device.

    o in ``call.out_dtype``; S, info and scores in the state dtype; n, m and merged
    int64; boundary bool. Arrays the launch made elsewhere (on the host) are moved.
    """
    xp, (B, _, H, _, _) = call.xp, call.shape
    as_ = lambda x, dtype: conform(xp, call.device, x, dtype)  # noqa: E731
    S, n, info, m = launched.cache
    scores, boundary, merged = launched.trace
    cache = (as_(S, call.state_dtype), as_(n, xp.int64), as_(info, call.state_dtype),
             as_(m, xp.int64))
    trace = (as_(scores, call.state_dtype), as_(boundary, xp.bool), as_(merged, xp.int64))
    return Result(o=from_streams(xp, as_(launched.o, call.out_dtype), B, H),
                  cache=cache_from_streams(xp, cache, B, H),
                  trace=Trace(*(from_streams(xp, x, B, H) for x in trace)), backend=call.backend)


# --- the pieces of prepare ----------------------------------------------------------------


def options_record(options: dict) -> Options:
    """The scalar options as ``dla_ref.Options``, defaults from it, checked by dla_ref."""
    unknown = sorted(set(options) - set(OPTION_NAMES) - set(ARRAY_KEYWORDS) - {"dtype"})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; dla takes "
                        f"{list(OPTION_NAMES + ARRAY_KEYWORDS)} and dtype")
    return check_options(**{name: options.get(name, getattr(DEFAULTS, name))
                            for name in OPTION_NAMES})


def check_backend_takes(impl, q, backbone):
    """TypeError unless ``impl`` takes q's namespace; NotImplementedError unless it
    computes ``backbone``."""
    ours = namespace_name(q)
    if ours not in impl.namespaces:
        raise TypeError(f"q must be a {' or '.join(impl.namespaces)} array for the "
                        f"{impl.name} backend, got a {ours} array ({type(q).__name__})")
    if backbone not in impl.backbones:
        raise NotImplementedError(f"the {impl.name} backend computes backbone "
                                  f"{' or '.join(map(repr, impl.backbones))}, not {backbone!r}")


def dtypes(xp, impl, arrays, requested=None, override=None):
    """(out_dtype, state_dtype) for these inputs, as ``xp`` dtypes.

    out_dtype: their result dtype, which ``impl`` must take (TypeError otherwise).
    state_dtype: ``impl.state_dtype_for(out_dtype)``; ``requested`` (dla's ``dtype=``)
    may choose another that the backend computes in (ValueError if it cannot);
    ``override`` (a name, for kernel tests) sets it unchecked.
    """
    out = dtype_name(xp.result_type(*arrays))
    if out not in impl.dtypes:
        raise TypeError(f"the {impl.name} backend takes {' or '.join(impl.dtypes)} inputs, "
                        f"got {out}")
    state = impl.state_dtype_for(out)
    if requested is not None and override is None:
        wanted = dtype_name(requested)
        if wanted != state and (impl.state_dtype is not None or wanted not in impl.dtypes):
            raise ValueError(f"dtype: the {impl.name} backend computes in {state} for "
                             f"{out} inputs, not in {wanted}")
        state = wanted
    return getattr(xp, out), getattr(xp, override or state)


def dtype_name(dtype) -> str:
    """A dtype's name as the registry writes it: "float32", "bfloat16", ..."""
    if isinstance(dtype, str):
        return dtype
    text = str(dtype)
    return text.split(".")[-1] if text.startswith("torch.") else np.dtype(dtype).name


def initial_state(xp, dev, initial_cache, K, shape, dtype):
    """The initial cache over streams, checked by dla_ref: a fresh copy (the kernel may
    write in place) in ``dtype`` on ``dev``, or an empty cache."""
    B, H, Dk, Dv = shape
    if initial_cache is None:
        return empty_cache(xp, B * H, K, Dk, Dv, dtype, dev)
    check_cache(xp, initial_cache, B, H, K, Dk, Dv)
    return cache_to_streams(xp, initial_cache, dtype)  # astype copies


def forced_trace(xp, trace, cache, K, shape) -> Forced:
    """A forced trace as streams on the host, after checking that it fits the cache.

    ``dla_ref.partition_history`` replays it on the slot counts of the initial cache and
    raises the reference's ValueError at the first decision that does not fit, so that no
    kernel needs to check (or synchronise) inside its token loop.
    """
    check_trace_shape(xp, trace, *shape)
    boundary, merged = (np.ascontiguousarray(to_host(x)) for x in trace_to_streams(xp, trace))
    _, n, _, m = cache
    partition_history(npx, boundary, merged, K, n=to_host(n), m=to_host(m))
    return Forced(boundary, merged)


def recording(arrays) -> bool:
    """Does torch autograd record through a call on these arrays?"""
    if not any(getattr(x, "requires_grad", False) for x in arrays):
        return False
    import torch

    return torch.is_grad_enabled()


# --- moving arrays -----------------------------------------------------------------------


def conform(xp, dev, x, dtype):
    """``x`` as an array of ``xp`` on ``dev`` with ``dtype`` (no copy if it already is)."""
    x = to_namespace(xp, dev, x)
    return x if x.dtype == dtype else xp.astype(x, dtype)


def empty_trace(xp, T, dev):
    """(scores, boundary, merged) for no stream: [0, T] each."""
    return (xp.zeros((0, T), device=dev), xp.zeros((0, T), dtype=xp.bool, device=dev),
            xp.zeros((0, T), dtype=xp.int64, device=dev))
