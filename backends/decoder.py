"""Decoding token by token: a session that validates once and keeps the cache on its backend.

    decoder = dla_backends.Decoder(capacity=30, tau=0.6, backbone="mamba2")
    o = decoder.prefill(q, k, v, lam, log_alpha=log_alpha)          # [B, T, H, ...], as dla()
    o_t = decoder.step(q_t, k_t, v_t, lam_t, log_alpha=log_alpha_t)  # one token: [B, H, ...]
    decoder.cache      # a dla_ref.Cache [B, H, ...] on the inputs' device
    decoder.trace      # the decisions so far (Decoder(record_trace=True))

``prefill`` is ``dla_backends.dla`` continuing the session's cache, with every check. The
first call (``prefill``, or a ``step``, which is then a prefill of one token) fixes the
backend, the namespace, device, dtypes and shapes; after it a step checks only what can
change from token to token (each array's type, shape, dtype and device, and its values:
NaN/inf, lam >= 0, log_alpha <= 0, beta in [0, 1], in one reduction) and runs the
backend's own one-token path on the cache it keeps between calls, updated in place
where the kernel writes in place. A prefill followed by steps computes what one ``dla``
call over the whole sequence computes on the same backend (outputs, cache, trace):
tests/test_decoder.py checks it on every backend that can decode here. Backends and
their one-token paths:

    numba                  ``numba_scan.decode_streams``: the cache stays in buffer order
                           between tokens (a merge moves K ints, no state)
    torch                  ``torch_scan.step`` with its slot map P kept between tokens
    triton, cupy,          the kernel's ``launch`` (the host contract, ``dla_backends.host``)
    cuda-model             with T = 1 on the session's cache
    reference              ``dla_ref``'s own scan with T = 1 (slowly)

torch-chunked is a prefill method with no one-token path: it cannot decode.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

import dla_ref
from dla_ref.recurrent import (cache_from_streams, cache_to_streams, scan, to_streams,
                               tokens_to_streams)
from dla_ref.step import dla_decision
from dla_ref.validation import check_inputs, check_options

from . import dla, get, host, select

__all__ = ["DECODERS", "Decoder"]

DECODERS = ("reference", "numba", "torch", "triton", "cuda-model", "cupy")
TOKEN_ARRAYS = ("q", "k", "v", "lam", "log_alpha", "beta")


class Decoder:
    """A decoding session: DLA over a stream that arrives a token (or a prompt) at a time.

    Options: those of ``dla_ref.dla`` (capacity, tau, backbone, score, normalize, slots,
    eps, dtype), checked here once. backend: an implementation name that can decode
    (``DECODERS``), or None for the one ``dla_backends.dla`` would pick for the first
    call's arrays. record_trace: keep every decision, for ``trace``.
    """

    def __init__(self, *, capacity=dla_ref.Options.capacity, tau=dla_ref.Options.tau,
                 backbone=dla_ref.Options.backbone, score=dla_ref.Options.score,
                 normalize=dla_ref.Options.normalize, slots=dla_ref.Options.slots,
                 eps=dla_ref.Options.eps, dtype=None, backend: str | None = None,
                 record_trace: bool = False):
        self.opts = check_options(capacity=capacity, tau=tau, backbone=backbone, score=score,
                                  normalize=normalize, slots=slots, eps=eps)
        if backend is not None:
            get(backend)  # an unknown name is a ValueError listing the known ones
            if backend not in DECODERS:
                raise ValueError(f"backend {backend!r} has no one-token path and cannot "
                                 f"decode; these can: {list(DECODERS)}")
        if not isinstance(record_trace, bool):
            raise TypeError(f"record_trace must be a bool, got {type(record_trace).__name__}")
        self.requested, self.dtype, self.record_trace = backend, dtype, record_trace
        self.session: Session | None = None  # made by the first call
        self.traces: list = []  # the decisions of each call, [B, T, H] fields

    @property
    def backend(self) -> str | None:
        """The implementation that decodes (None before the first call)."""
        return None if self.session is None else self.session.name

    @property
    def cache(self) -> dla_ref.Cache | None:
        """The cache after the last token, a copy [B, H, ...] (None before the first call)."""
        return None if self.session is None else self.session.cache()

    @property
    def trace(self) -> dla_ref.Trace:
        """Every decision so far, [B, T, H] fields over all tokens given."""
        if not self.record_trace:
            raise ValueError("the trace is kept only by Decoder(record_trace=True)")
        if not self.traces:
            return None
        xp = self.session.xp
        return dla_ref.Trace(*(xp.concat([t[f] for t in self.traces], axis=1)
                               for f in range(3)))

    def prefill(self, q, k, v, lam=None, *, log_alpha=None, beta=None):
        """``dla`` over T tokens ([B, T, H, ...] inputs), continuing the cache.   -> o

        The arguments and checks of ``dla_backends.dla``; returns o [B, T, H, Dv].
        """
        name = self.session.name if self.session is not None else self.choose(q)
        result = dla(q, k, v, lam, log_alpha=log_alpha, beta=beta,
                     **dataclasses.asdict(self.opts),
                     dtype=self.dtype, initial_cache=self.cache, backend=name)
        arrays = dict(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
        self.session = open_session(name, self.opts, arrays, result)
        if self.record_trace:
            self.traces.append(result.trace)
        return result.o

    def step(self, q, k, v, lam=None, *, log_alpha=None, beta=None):
        """One token of every stream: q, k [B, H, Dk], v [B, H, Dv], lam [B, H, K] (or
        None, or any shape that broadcasts to it), log_alpha, beta [B, H].   -> o [B, H, Dv]
        """
        arrays = dict(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
        if self.session is None:
            return self.prefill(**one_token_axis(arrays))[:, 0, ...]
        token = self.session.spec.check(arrays, self.opts)
        o, decided = self.session.step(token)
        if self.record_trace:
            self.traces.append(dla_ref.Trace(*(x[:, None, ...] for x in decided)))
        return o

    def choose(self, q) -> str:
        """The decoding implementation for arrays like q: the requested one, or dla's
        choice (which is always one that can decode, or the reference)."""
        if array_api_compat.is_array_api_obj(q):
            name = select(q, self.requested, backbone=self.opts.backbone,
                          compute=None if self.dtype is None else host.dtype_name(self.dtype)
                          ).name
            return name if name in DECODERS else "reference"
        return self.requested or "reference"  # dla() names the bad argument


def one_token_axis(arrays: dict) -> dict:
    """A token's arrays with a T axis of one, for the first step: q, k, v and lam
    [B, H, ...] -> [B, 1, H, ...], log_alpha and beta [B, H] -> [B, 1, H].

    q must be one token, [B, H, Dk]; a lam of fewer axes ([H, K], [K]) broadcasts as it
    is; anything that is not an array is passed on for dla's checks to name.
    """
    q = arrays["q"]
    if array_api_compat.is_array_api_obj(q) and q.ndim != 3:
        raise ValueError(f"q must have shape [B, H, Dk] (one token), got {list(q.shape)}")
    rank = dict(log_alpha=2, beta=2)  # the others: 3

    def expand(name, x):
        if array_api_compat.is_array_api_obj(x) and x.ndim == rank.get(name, 3):
            return x[:, None, ...]
        return x

    return {name: expand(name, x) for name, x in arrays.items()}


# --- what a step checks ------------------------------------------------------------------


class TokenSpec(NamedTuple):
    """What every token must look like, fixed by the session's first call.

    kind    the array type (numpy.ndarray, torch.Tensor, ...); namespace its name
    xp      its array-api-compat namespace; device the device of q
    shapes  name -> [B, H, ...] shape of one token (only the arrays the backbone takes)
    dtypes  name -> dtype
    """

    kind: type
    namespace: str
    xp: Any
    device: Any
    shapes: dict
    dtypes: dict

    def check(self, arrays: dict, opts) -> dict:
        """The token's arrays, checked (TypeError/ValueError naming the argument); lam
        filled with ones if None and broadcast to [B, H, K]."""
        given = [name for name in ("log_alpha", "beta")
                 if arrays[name] is not None and name not in self.shapes]
        if given:
            raise ValueError(f"{given[0]} is not used by backbone={opts.backbone!r}; pass None")
        token = {name: self.check_array(name, arrays[name]) for name in self.shapes}
        self.check_values(token, opts)
        return token

    def check_array(self, name, x):
        want = self.shapes[name]
        if x is None:
            if name != "lam":
                raise ValueError(f"{name} {shape_text(want)} is required: this session "
                                 "decodes a backbone that takes it")
            return self.xp.ones(want, dtype=self.dtypes[name], device=self.device)
        if not isinstance(x, self.kind):
            raise TypeError(f"{name} must be a {self.namespace} array like the session's "
                            f"first call, got {type(x).__name__}")
        if name == "lam" and tuple(x.shape) != want:
            x = broadcast(self.xp, x, want)
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {shape_text(want)} (one token), got "
                             f"{list(x.shape)}")
        if x.dtype != self.dtypes[name]:
            raise TypeError(f"{name} must have dtype {self.dtypes[name]} like the session's "
                            f"first call, got {x.dtype}")
        if self.namespace != "numpy" and array_api_compat.device(x) != self.device:
            raise ValueError(f"{name} must be on {self.device} like the session's first "
                             f"call, got {array_api_compat.device(x)}")
        return x

    def check_values(self, token, opts):
        """NaN/inf, lam >= 0, log_alpha <= 0, beta in [0, 1], screened with one reduction
        per array and one device synchronisation; a token the screen flags is judged by
        dla_ref's own check, which names the argument.

        The screen: a sum is finite iff every term is, short of overflow (which only
        sends a good token to the full check); the extremes carry the ranges and NaN.
        """
        xp = self.xp
        screen = [xp.sum(x) for x in token.values()] + [xp.min(token["lam"])]
        if "log_alpha" in token:
            screen.append(-xp.max(token["log_alpha"]))
        if "beta" in token:
            screen += [xp.min(token["beta"]), 1 - xp.max(token["beta"])]
        screen = xp.stack([xp.astype(x, xp.float64) for x in screen])
        fine = xp.all(xp.isfinite(screen)) & xp.all(screen[len(token):] >= 0)
        if not bool(fine):
            full = one_token_axis({name: token.get(name) for name in TOKEN_ARRAYS})
            check_inputs(xp, *full.values(), opts.backbone, lam_columns=opts.capacity)


def shape_text(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def broadcast(xp, x, shape):
    """x broadcast to ``shape``, or x itself if it does not broadcast (the caller names it)."""
    try:
        return xp.broadcast_to(x, shape)
    except (ValueError, RuntimeError):  # torch says RuntimeError
        return x


def token_spec(arrays: dict, result, opts) -> TokenSpec:
    """The TokenSpec of a session whose first call took ``arrays`` ([B, T, H, ...])."""
    q = arrays["q"]
    xp = array_api_compat.array_namespace(q)
    B, _, H, Dk = q.shape
    Dv, K = arrays["v"].shape[3], opts.capacity
    shapes = dict(q=(B, H, Dk), k=(B, H, Dk), v=(B, H, Dv), lam=(B, H, K))
    if opts.backbone != "linear":
        shapes["log_alpha"] = (B, H)
    if opts.backbone == "gdn":
        shapes["beta"] = (B, H)
    dtypes = {name: q.dtype if arrays.get(name) is None else arrays[name].dtype
              for name in shapes}
    return TokenSpec(type(q), host.namespace_name(q), xp, array_api_compat.device(q),
                     shapes, dtypes)


# --- sessions: the cache on the backend, and its one-token path ------------------------


class Session:
    """A backend's decoding state: the cache over streams (S [N, K, Dk, Dv], n, info, m)
    as the backend keeps it, and how to advance it by one token."""

    def __init__(self, name, opts, arrays, result):
        self.name, self.opts = name, opts
        self.spec = token_spec(arrays, result, opts)
        self.xp, self.device = self.spec.xp, self.spec.device
        q, v = arrays["q"], arrays["v"]
        self.dims = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])  # B, H, Dk, Dv
        self.out_dtype = result.o.dtype
        self.state_dtype = result.cache.S.dtype
        self.storage = tuple(cache_to_streams(self.xp, result.cache, self.state_dtype))

    def streams(self, token: dict):
        """The token as ``dla_ref.Tokens`` of streams [N, 1, ...] in the state dtype, and
        log_alpha [N, 1] (for kernels that sum log decays) or None."""
        one = {name: None if token.get(name) is None else token[name][:, None, ...]
               for name in TOKEN_ARRAYS}
        tokens = tokens_to_streams(self.xp, self.state_dtype, *one.values())
        log_alpha = one["log_alpha"]
        if log_alpha is not None:
            log_alpha = to_streams(self.xp, self.xp.astype(log_alpha, self.state_dtype))
        return tokens, log_alpha

    def step(self, token: dict):
        """Advance by one token.   -> (o [B, H, Dv], (scores, boundary, merged) [B, H])"""
        B, H, Dk, Dv = self.dims
        tokens, log_alpha = self.streams(token)
        call = host.Call(self.name, self.xp, self.device, self.opts, (B, 1, H, Dk, Dv),
                         tokens, log_alpha, self.storage, None, self.state_dtype,
                         self.out_dtype, False)
        launched = self.launch(call)
        self.storage = tuple(launched.cache)
        result = host.finish(call, launched)
        return result.o[:, 0, ...], tuple(x[:, 0, ...] for x in result.trace)

    def launch(self, call: host.Call) -> host.Launched:
        """The implementation's kernel on one token (the host contract's ``launch``)."""
        module = get(self.name).loader.partition(":")[0]
        return importlib.import_module(module).launch(call)

    def cache(self) -> dla_ref.Cache:
        """A copy of the cache, [B, H, ...] in slot order."""
        B, H = self.dims[:2]
        copy = lambda x: self.xp.asarray(x, copy=True)  # noqa: E731
        return cache_from_streams(self.xp, tuple(copy(x) for x in self.storage), B, H)


class ReferenceSession(Session):
    """dla_ref's scan, one token at a time (slow, but the definition)."""

    def launch(self, call: host.Call) -> host.Launched:
        decide = dla_decision(call.xp, call.opts)
        cache, o, trace = scan(call.xp, call.tokens, call.cache, call.opts, lambda t: decide)
        return host.Launched(o, cache, trace)


class NumbaSession(Session):
    """numba_scan.decode_streams on NumPy arrays the session owns, written in place.

    Slot i of stream s lives in buffer order[s, i] between tokens; ``cache`` puts the
    buffers back in slot order (and resets ``order``) when it is read.
    """

    def __init__(self, name, opts, arrays, result):
        super().__init__(name, opts, arrays, result)
        self.storage = tuple(np.ascontiguousarray(x) for x in self.storage)
        N, K = self.storage[1].shape
        self.order = np.tile(np.arange(K), (N, 1))
        self.ones = np.ones((N, 1), self.state_dtype)  # alpha (linear), beta (not gdn)

    def step(self, token: dict):
        from .kernels import numba_scan

        B, H, Dk, Dv = self.dims
        N, dtype, opts = B * H, self.state_dtype, self.opts
        flat = lambda x, *shape: np.ascontiguousarray(  # noqa: E731
            x.reshape((N, 1) + shape), dtype=dtype)
        q, k, v = flat(token["q"], Dk), flat(token["k"], Dk), flat(token["v"], Dv)
        lam = flat(token["lam"], opts.capacity)
        log_alpha, beta = token.get("log_alpha"), token.get("beta")
        alpha = self.ones if log_alpha is None else np.exp(flat(log_alpha))
        beta = self.ones if beta is None else flat(beta)
        o, scores = np.empty((N, 1, Dv), dtype), np.empty((N, 1), dtype)
        boundary, merged = np.zeros((N, 1), np.bool_), np.full((N, 1), -1, np.int64)
        S, n, info, m = self.storage
        numba_scan.decode_streams(
            q, k, v, lam, alpha, beta, S, self.order, n, info, m, o, scores, boundary,
            merged, numba_scan.BACKBONE_CODE[opts.backbone], opts.score == "state",
            opts.normalize, opts.slots == "newest-first", opts.tau, opts.eps)
        o = o.reshape(B, H, Dv).astype(self.out_dtype, copy=False)
        return o, tuple(x.reshape(B, H) for x in (scores, boundary, merged))

    def cache(self) -> dla_ref.Cache:
        from .kernels.numba_scan import put_in_slot_order

        S = self.storage[0]
        for s in range(S.shape[0]):
            put_in_slot_order(S[s], self.order[s])
        self.order[:] = np.arange(self.order.shape[1])
        return super().cache()


class TorchSession(Session):
    """torch_scan's step on tensors the session owns: the slot fields are rows addressed
    through the slot map P [N, K], kept between tokens, so a merge moves entries of P and
    no state, and every write is an in-place index write. ``cache`` reads the rows in
    slot order."""

    def __init__(self, name, opts, arrays, result):
        import torch

        super().__init__(name, opts, arrays, result)
        N, K = self.storage[1].shape
        P = torch.arange(N * K, device=self.device).reshape(N, K)
        self.storage = tuple(x.contiguous() for x in self.storage) + (P,)
        self.decide = dla_decision(self.xp, opts)

    def step(self, token: dict):
        from .kernels import torch_scan

        B, H, _, Dv = self.dims
        tokens, _ = self.streams(token)
        (one,) = torch_scan.per_token(tokens)
        self.storage, o, score, boundary, merged = torch_scan.step(
            self.xp, self.storage, one, self.opts, self.decide, False)
        o = o.reshape(B, H, Dv).to(self.out_dtype)
        return o, tuple(x.reshape(B, H) for x in (score, boundary, merged))

    def cache(self) -> dla_ref.Cache:
        from .kernels.torch_scan import logical

        S, n, info, m, P = self.storage
        B, H = self.dims[:2]
        return cache_from_streams(self.xp, (logical(S, P), logical(n, P), logical(info, P),
                                            m.clone()), B, H)


def open_session(name, opts, arrays, result) -> Session:
    """The session of implementation ``name`` continuing from ``result`` (a dla Result of
    the call that took ``arrays``)."""
    kind = {"reference": ReferenceSession, "numba": NumbaSession,
            "torch": TorchSession}.get(name, Session)
    return kind(name, opts, arrays, result)

