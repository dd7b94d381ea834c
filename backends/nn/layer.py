"""``DLAAttention``: a trainable DLA layer in the style of flash-linear-attention's layers.

    x [B, T, d_model] -> q, k [B, T, H, Dk], v [B, T, H, Dv], gates, lam [B, T, H, K]
                      -> DLA memory (policy: dla | fixed | loglinear | single)
                      -> per-head RMSNorm -> output projection -> y [B, T, d_model]

Backbone gates (docs/spec/backbones.md):
- mamba2: Delta_t = softplus(W_Delta x_t + b) [H], A = -exp(A_log) per head,
  log alpha_t = Delta_t A, and Delta folded into the value (v_t <- Delta_t v_t), as
  Mamba-2 scales its input by Delta.
- gdn: the same alpha as Gated DeltaNet writes it, beta_t = sigmoid(W_beta x_t), and
  q, k L2-normalised per head (the delta rule needs ||k|| = 1 to stay bounded).
- linear: no gate.
Readout weights: lam_t = softplus(L * (W_lam x_t)), one column per slot (per level for
loglinear), L a learned [H, K] scale.

``policy`` changes only the partition; projections, gates, readout and normalisation are
the same code with the same parameter shapes, so the four models differ in nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import dla_ref

from . import functional as F

POLICIES = ("dla", "fixed", "loglinear", "single")
GATES = ("hard", "ste")
CORES = ("auto", "masked", "scan")


@dataclass
class LayerCache:
    """What a layer carries from one call to the next when decoding.

    state: for dla, the decoding sessions [(heads, dla_backends.Decoder)]; for fixed and
    single, the DLA cache (dla_ref.Cache [B, H, ...]);
    history: for loglinear, the projected (q, k, v, lam, log_alpha) of every token so far
    (Log-Linear's levels are recomputed from it: O(T) per decoded token);
    seen: tokens consumed so far; chunk: the fixed policy's C;
    tail: the short convolution's input over the last conv_size - 1 tokens.
    """

    state: Any = None
    history: tuple | None = None
    seen: int = 0
    chunk: int | None = None
    tail: Any = None


class DLAAttention(nn.Module):
    """Dynamic Linear Attention as a token mixer.   x [B, T, d_model] -> (y, cache)

    d_model, n_heads: model width and heads (d_model % n_heads == 0).
    backbone: "mamba2" | "gdn" | "linear".
    capacity: K, the number of states (slots; Log-Linear levels).
    tau: the boundary threshold (initial value of the per-head tau when gate="ste").
    policy: "dla" | "fixed" (a slot every ``chunk`` tokens, default ceil(T / K)) |
        "loglinear" (needs K >= 1 + bit_length(T - 1)) | "single" (one state).
    gate: "hard" (tau gets no gradient) | "ste" (the straight-through soft gate of
        docs/training.md; policy "dla", backbone linear or mamba2).
    temperature: the soft gate's temperature.
    head_k_dim, head_v_dim: per-head key and value sizes (default d_model / n_heads).
    core: "masked" (the quadratic form, linear/mamba2), "scan" (``dla_backends.dla``
        under a forced trace), "auto" (masked where it applies, else scan).
    conv_size: width of the short causal convolution on q, k, v (1 or 0: none).
    """

    def __init__(self, d_model, n_heads, *, backbone="mamba2", capacity=8, tau=0.6,
                 policy="dla", gate="hard", temperature=0.1, head_k_dim=None,
                 head_v_dim=None, chunk=None, core="auto", conv_size=4, eps=1e-6):
        super().__init__()
        check_layer_options(d_model, n_heads, backbone, capacity, policy, gate, temperature,
                            core)
        self.n_heads, self.capacity, self.policy, self.gate = n_heads, capacity, policy, gate
        self.backbone, self.temperature, self.chunk, self.eps = backbone, temperature, chunk, eps
        self.dk = head_k_dim or d_model // n_heads
        self.dv = head_v_dim or d_model // n_heads
        self.core = ("masked" if backbone != "gdn" else "scan") if core == "auto" else core
        if self.core == "masked" and backbone == "gdn":
            raise ValueError("core='masked' needs backbone 'linear' or 'mamba2' (gdn's "
                             "transition is a matrix per token); use core='scan'")
        H = n_heads
        self.q_proj = nn.Linear(d_model, H * self.dk, bias=False)
        self.k_proj = nn.Linear(d_model, H * self.dk, bias=False)
        self.v_proj = nn.Linear(d_model, H * self.dv, bias=False)
        channels = H * (2 * self.dk + self.dv)
        self.conv = nn.Conv1d(channels, channels, conv_size, groups=channels) \
            if conv_size > 1 else None
        self.last_tail = None
        self.lam_proj = nn.Linear(d_model, H * capacity)
        self.lam_scale = nn.Parameter(torch.ones(H, capacity))  # L in softplus(L * W x)
        if backbone != "linear":
            self.dt_proj = nn.Linear(d_model, H)
            self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, H)))
            nn.init.zeros_(self.dt_proj.weight)
            with torch.no_grad():  # Mamba-2's Delta at init: log-uniform in [1e-2, 1e-1]
                dt = torch.exp(torch.linspace(math.log(1e-2), math.log(1e-1), H))
                self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        if backbone == "gdn":
            self.beta_proj = nn.Linear(d_model, H)
        self.tau = nn.Parameter(torch.full((H,), float(tau)), requires_grad=gate == "ste")
        self.o_norm = nn.RMSNorm(self.dv, eps=1e-8)
        self.o_proj = nn.Linear(H * self.dv, d_model, bias=False)
        self.last_trace = None  # (boundary, merged) [B, T, H] of the last forward, for plots

    # --- projections and gates -----------------------------------------------------------

    def project(self, x, tail=None):
        """(q, k, v, lam, log_alpha, beta) of x [B, T, d_model] as DLA takes them.

        tail: the short convolution's input over the previous conv_size - 1 tokens (when
        decoding; zeros before the first token). ``self.last_tail`` keeps this call's.
        """
        B, T, _ = x.shape
        H = self.n_heads
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if self.conv is not None:
            qkv, self.last_tail = self.short_conv(qkv, tail)
        q, k, v = qkv.split([H * self.dk, H * self.dk, H * self.dv], dim=-1)
        q, k, v = q.view(B, T, H, self.dk), k.view(B, T, H, self.dk), v.view(B, T, H, self.dv)
        lam = nn.functional.softplus(self.lam_scale * self.lam_proj(x).view(B, T, H, -1))
        log_alpha = beta = None
        if self.backbone != "linear":
            delta = nn.functional.softplus(self.dt_proj(x))  # [B, T, H]
            log_alpha = -torch.exp(self.A_log) * delta
        if self.backbone == "mamba2":
            v = v * delta[..., None]
            q = q / math.sqrt(self.dk)
        elif self.backbone == "gdn":
            q = nn.functional.normalize(q, dim=-1) / math.sqrt(self.dk)
            k = nn.functional.normalize(k, dim=-1)
            beta = torch.sigmoid(self.beta_proj(x))
        else:
            q = q / math.sqrt(self.dk)
        return q, k, v, lam, log_alpha, beta

    def short_conv(self, qkv, tail):
        """SiLU(causal depthwise convolution over the last conv_size tokens), as
        flash-linear-attention's ShortConvolution: it lets a token's key and value see
        the tokens just before it.   qkv [B, T, C] -> ([B, T, C], new tail [B, w-1, C])"""
        width = self.conv.kernel_size[0]
        if tail is None:
            tail = qkv.new_zeros(qkv.shape[0], width - 1, qkv.shape[2])
        padded = torch.cat([tail, qkv], dim=1)
        out = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        return nn.functional.silu(out), padded[:, padded.shape[1] - (width - 1):]

    def forward(self, x, cache: LayerCache | None = None, use_cache: bool = False):
        """y [B, T, d_model] and the cache (None unless ``use_cache`` or ``cache`` given).

        Without a cache: the training path (prefill from an empty memory, differentiable).
        With ``use_cache`` or a cache: prefill / decode without gradient, continuing from
        ``cache``; chaining calls gives the same y as one call on the whole sequence.
        """
        q, k, v, lam, log_alpha, beta = self.project(x, None if cache is None else cache.tail)
        if cache is None and not use_cache:
            o = self.mix(q, k, v, lam, log_alpha, beta)
        else:
            o, cache = self.decode(q, k, v, lam, log_alpha, beta, cache or LayerCache())
            cache.tail = self.last_tail
        B, T = x.shape[:2]
        return self.o_proj(self.o_norm(o).reshape(B, T, -1)), cache

    # --- the training path ---------------------------------------------------------------

    def mix(self, q, k, v, lam, log_alpha, beta):
        """The policy's memory over the whole sequence, from an empty cache.   [B, T, H, Dv]"""
        B, T, H, _ = q.shape
        if self.policy == "loglinear":
            check_levels(T, self.capacity)
            return self.run_core(q, k, v, lam, log_alpha, beta,
                                 torch.as_tensor(F.fenwick_slot_map(T)), None)
        boundary, merged = self.decide(k, v, lam, log_alpha, beta)
        self.last_trace = (boundary, merged)
        K = 1 if self.policy == "single" else self.capacity
        to_streams = lambda a: a.transpose(0, 2, 1).reshape(B * H, T)  # noqa: E731
        slot = F.slot_map_from_trace(to_streams(boundary), to_streams(merged), K)
        slot = torch.as_tensor(slot).view(B, H, T, T)
        return self.run_core(q, k, v, lam, log_alpha, beta, slot, (boundary, merged))

    def decide(self, k, v, lam, log_alpha, beta):
        """The policy's trace, without gradient.   -> (boundary, merged) [B, T, H] NumPy"""
        B, T, H, _ = k.shape
        if self.policy == "single":
            boundary = np.zeros((B, T, H), dtype=bool)
            boundary[:, 0] = True
            return boundary, np.full((B, T, H), -1, dtype=np.int64)
        inputs = [None if a is None else a.detach().float().numpy()
                  for a in (k, v, lam, log_alpha, beta)]
        if self.policy == "fixed":
            chunk = self.chunk or math.ceil(T / self.capacity)
            if math.ceil(T / chunk) > self.capacity:  # merges, chosen by density: the scan
                trace = dla_ref.fixed(np.zeros_like(inputs[0]), *inputs[:3], chunk=chunk,
                                      backbone=self.backbone, log_alpha=inputs[3],
                                      beta=inputs[4], capacity=self.capacity).trace
                return np.asarray(trace.boundary), np.asarray(trace.merged)
            boundary, merged = F.fixed_trace(B * H, T, chunk)
            return (boundary.reshape(B, H, T).transpose(0, 2, 1),
                    merged.reshape(B, H, T).transpose(0, 2, 1))
        return self.decide_per_tau(*inputs)

    def run_core(self, q, k, v, lam, log_alpha, beta, slot, trace):
        """o [B, T, H, Dv] under a partition: slot [B, H, T, T] (or [T, T]) of every pair."""
        if self.core == "scan":
            return self.scan_core(q, k, v, lam, log_alpha, beta, trace)
        weights = F.readout_mask(lam, slot)
        if self.gate == "ste" and self.policy == "dla":
            weights = self.straight_through(weights, k, v, log_alpha, trace)
        return F.masked_attention(q, k, v, weights, F.decay_matrix(log_alpha, q.shape[1],
                                                                  q.device))

    def straight_through(self, weights, k, v, log_alpha, trace, soft_at=None):
        """The readout mask of the relaxed write (``functional.relaxed_readout_mask``).

        soft_at: b~ at the point of evaluation; None = this call's own b~, detached (the
        straight-through estimator). Passing a fixed one evaluates the relaxed objective
        itself elsewhere (the finite-difference test does).
        """
        soft, boundary, free = self.soft_gate(k, v, log_alpha, trace)
        soft_at = soft.detach() if soft_at is None else soft_at
        return F.relaxed_readout_mask(weights, boundary, soft, soft_at, free)

    def soft_gate(self, k, v, log_alpha, trace):
        """(b~ [B, H, T], hard boundary [B, H, T] bool, free [B, H, T] bool) of a trace."""
        boundary, merged = (torch.as_tensor(np.ascontiguousarray(a.transpose(0, 2, 1)))
                            for a in trace)
        B, H, T = boundary.shape
        starts = F.open_starts(boundary.reshape(B * H, T).numpy(),
                               merged.reshape(B * H, T).numpy(), self.capacity)
        starts = torch.as_tensor(starts).view(B, H, T)
        ss, SS, sS = F.score_scalars(k, v, log_alpha, boundary, starts)
        score = F.information_score(ss, SS, sS, self.dk * self.dv, self.eps)
        free = (torch.arange(T) > 0).expand(B, H, T)  # token 0 always opens slot 0
        return F.soft_boundary(score, self.tau, self.temperature), boundary, free

    def scan_core(self, q, k, v, lam, log_alpha, beta, trace):
        """o through ``dla_backends.dla`` (or Log-Linear's recurrence) under the trace."""
        import dla_backends

        if self.policy == "loglinear":
            return dla_ref.loglinear(q, k, v, lam, backbone=self.backbone,
                                     log_alpha=log_alpha, beta=beta, dtype=q.dtype)
        K = 1 if self.policy == "single" else self.capacity
        forced = dla_ref.Trace(torch.zeros(trace[0].shape), torch.as_tensor(trace[0]),
                               torch.as_tensor(trace[1]))
        return dla_backends.dla(q, k, v, lam[..., :K], backbone=self.backbone,
                                log_alpha=log_alpha, beta=beta, capacity=K,
                                trace=forced).o

    # --- decisions and decoding without gradient -----------------------------------------

    def decide_per_tau(self, k, v, lam, log_alpha, beta):
        """The dla policy's trace, heads grouped by their tau (one call if all agree).

        NumPy inputs [B, T, H, ...] (so ``dla_backends.dla`` runs the compiled Numba
        scan). -> (boundary [B, T, H] bool, merged [B, T, H] int64)
        """
        import dla_backends

        traces = []
        for heads, tau in self.tau_groups():
            pick = [None if a is None else a[:, :, heads] for a in (k, v, lam, log_alpha, beta)]
            traces.append(dla_backends.dla(np.zeros_like(pick[0]), *pick[:3], log_alpha=pick[3],
                                           beta=pick[4], tau=tau, backbone=self.backbone,
                                           capacity=self.capacity).trace)
        return tuple(np.concatenate([np.asarray(getattr(t, field)) for t in traces], axis=2)
                     for field in ("boundary", "merged"))

    def decoders(self):
        """[(heads, dla_backends.Decoder)]: one session for all heads if they share tau,
        else one per head (a session has one tau)."""
        from dla_backends import Decoder

        return [(heads, Decoder(capacity=self.capacity, tau=tau, backbone=self.backbone))
                for heads, tau in self.tau_groups()]

    def tau_groups(self):
        """[(heads, tau)]: all heads at once if they share tau, else head by head."""
        taus = [float(t) for t in self.tau.detach()]
        if len(set(taus)) == 1:
            return [(slice(None), taus[0])]
        return [(slice(h, h + 1), tau) for h, tau in enumerate(taus)]

    @torch.no_grad()
    def decode(self, q, k, v, lam, log_alpha, beta, cache: LayerCache):
        """Continue the memory in ``cache`` over these tokens.   -> (o, new cache)"""
        T = q.shape[1]
        if self.policy == "loglinear":
            history = tuple(new if old is None else torch.cat([old, new], dim=1)
                            for old, new in zip(cache.history or (None,) * 6,
                                                (q, k, v, lam, log_alpha, beta)))
            o = self.mix(*history)[:, -T:]
            return o, LayerCache(history=history, seen=cache.seen + T)
        if self.policy == "dla":
            sessions = cache.state or self.decoders()
            o = torch.cat([decode_heads(decoder, heads, q, k, v, lam, log_alpha, beta)
                           for heads, decoder in sessions], dim=2)
            return o.to(q.dtype), LayerCache(state=sessions, seen=cache.seen + T)
        K = 1 if self.policy == "single" else self.capacity
        chunk = cache.chunk or self.chunk or math.ceil(T / K)
        if self.policy == "single":
            chunk = cache.seen + T + 1  # one block: only the first token opens a slot
        result = dla_ref.fixed(q, k, v, lam[..., :K], chunk=chunk, backbone=self.backbone,
                               log_alpha=log_alpha, beta=beta, capacity=K,
                               initial_cache=cache.state, dtype=q.dtype)
        return result.o, LayerCache(state=result.cache, seen=cache.seen + T, chunk=chunk)


def decode_heads(decoder, heads, q, k, v, lam, log_alpha, beta):
    """The decoding session of some heads over T tokens: a prefill, or a step when T = 1.
    -> o [B, T, h, Dv]"""
    pick = [None if a is None else a[:, :, heads] for a in (q, k, v, lam, log_alpha, beta)]
    if q.shape[1] > 1:
        return decoder.prefill(*pick[:4], log_alpha=pick[4], beta=pick[5])
    one = [None if a is None else a[:, 0] for a in pick]
    return decoder.step(*one[:4], log_alpha=one[4], beta=one[5])[:, None]


def check_levels(T, capacity):
    """Log-Linear needs one lam column per level: 1 + bit_length(T - 1) <= K."""
    if dla_ref.fenwick_levels(T) > capacity:
        raise ValueError(f"policy='loglinear' needs capacity >= {dla_ref.fenwick_levels(T)} "
                         f"(its level count) for T={T}, got {capacity}")


def check_layer_options(d_model, n_heads, backbone, capacity, policy, gate, temperature, core):
    """ValueError naming the first bad option of ``DLAAttention``."""
    if not (isinstance(n_heads, int) and n_heads >= 1 and isinstance(d_model, int)
            and d_model % n_heads == 0):
        raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model!r}, "
                         f"n_heads={n_heads!r}")
    choices = {"backbone": (backbone, dla_ref.BACKBONES), "policy": (policy, POLICIES),
               "gate": (gate, GATES), "core": (core, CORES)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if gate == "ste" and (policy != "dla" or backbone == "gdn"):
        raise ValueError("gate='ste' needs policy='dla' and backbone 'linear' or 'mamba2' "
                         f"(got policy={policy!r}, backbone={backbone!r})")
