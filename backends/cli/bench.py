"""``dla bench``: the benchmark workloads on every available backend, checked, then timed.

    dla bench                          every backend, every workload (minutes)
    dla bench --quick                  T / 16: a smoke test, or a one-shot GPU run
    dla bench --backends torch-chunked,numba --workloads prefill-mamba2 --json out.json
    dla bench --device cuda            CUDA events, L2 flushed before every timed call

Each backend and workload is first checked (its first --check-tokens tokens through
dla_backends.testing.check_case; one that fails is not timed), then timed: the least of
--repeat calls after a warm-up (on a shared machine other work only adds time); a figure
whose projected time exceeds --budget is timed on fewer tokens, per token. Decode goes
through the decode session (dla_backends.Decoder) from a full cache, one step per token,
beside one read-and-write pass over the cache timed in the same run. On CUDA the anchors
of flash-linear-attention are timed at the same shapes when ``fla`` imports.

docs/benchmarks.md: the workloads, the inputs, what every column and JSON field means,
and the last full run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

# --- the workloads and their inputs --------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration (docs/benchmarks.md, "Workloads")."""

    B: int
    H: int
    T: int
    D: int
    K: int
    backbone: str
    decode: bool = False
    train: bool = False


WORKLOADS = {
    "decode": Workload(1, 8, 2048, 64, 30, "mamba2", decode=True),
    "prefill-mamba2": Workload(2, 8, 4096, 64, 30, "mamba2"),
    "prefill-linear": Workload(2, 8, 4096, 64, 30, "linear"),
    "gdn": Workload(1, 4, 1024, 64, 30, "gdn"),
    "train-mamba2": Workload(2, 8, 4096, 64, 30, "mamba2", train=True),
    # the shape a small training run uses (the gradient issue's target is stated there)
    "train-small": Workload(4, 2, 256, 32, 8, "mamba2", train=True),
}
TAU = 0.6
ESSENTIAL_CHUNK = 64


def piecewise_inputs(w: Workload, T: int, seed: int) -> dict:
    """q, k, v, lam (and log_alpha, beta) for T tokens: NumPy float64 holding float32 values.

    Each stream is cut into segments of 32 to 95 tokens; a segment's keys and values are
    unit vectors within about 0.02 of its own random direction; q ~ N(0, 1/d), lam ~
    U(0, 1), log alpha ~ U(-0.1, 0), beta ~ U(0, 1). Rounded through float32, so that
    the reference checks the very numbers the backends are given.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    B, H, D = w.B, w.H, w.D
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    segment = np.cumsum(rng.integers(32, 96, size=(B, H, T)), axis=2)
    index = np.stack([[np.searchsorted(segment[b, h], np.arange(T), side="right")
                       for h in range(H)] for b in range(B)]).transpose(0, 2, 1)  # [B, T, H]
    directions = lambda: unit(rng.standard_normal((B, T, H, D)))  # noqa: E731  (T >= segments)
    pick = lambda d: np.take_along_axis(d, index[..., None], axis=1)  # noqa: E731
    arrays = dict(
        q=rng.standard_normal((B, T, H, D)) / math.sqrt(D),
        k=unit(pick(directions()) + 0.02 / math.sqrt(D) * rng.standard_normal((B, T, H, D))),
        v=unit(pick(directions()) + 0.02 / math.sqrt(D) * rng.standard_normal((B, T, H, D))),
        lam=rng.random((B, T, H, w.K)),
        log_alpha=None if w.backbone == "linear" else -0.1 * rng.random((B, T, H)),
        beta=rng.random((B, T, H)) if w.backbone == "gdn" else None,
    )
    return {name: as_float32_values(x) for name, x in arrays.items()}


def as_float32_values(x):
    """x rounded through float32, kept as float64 (None stays None)."""
    import numpy as np

    return None if x is None else x.astype(np.float32).astype(np.float64)


def decode_prompt(w: Workload, seed: int) -> dict:
    """K + 2 white-noise tokens (float32 values) that fill a decode cache.

    Every such token opens a slot (its score is about sqrt(2) > tau), so after them the
    cache is full, and has merged twice, when the timed tokens begin.
    """
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    shape = (w.B, w.K + 2, w.H)
    prompt = dict(q=rng.standard_normal(shape + (w.D,)), k=rng.standard_normal(shape + (w.D,)),
                  v=rng.standard_normal(shape + (w.D,)), lam=rng.random(shape + (w.K,)),
                  log_alpha=None if w.backbone == "linear" else -0.1 * rng.random(shape),
                  beta=rng.random(shape) if w.backbone == "gdn" else None)
    return {name: as_float32_values(x) for name, x in prompt.items()}


def full_cache(w: Workload, prompt: dict, capacity: int):
    """The reference's cache after the prompt at ``capacity`` (float32 values)."""
    import dla_ref

    arrays = {**prompt, "lam": prompt["lam"][..., :capacity]}
    cache = dla_ref.dla(**arrays, backbone=w.backbone, capacity=capacity, tau=TAU).cache
    return dla_ref.Cache(as_float32_values(cache.S), cache.n, as_float32_values(cache.info),
                         cache.m)


def cut(arrays: dict, T: int) -> dict:
    """The first T tokens of every per-token input (an initial cache is kept whole)."""
    return {name: x if x is None or name == "initial_cache" else x[:, :T]
            for name, x in arrays.items()}


# --- the backends ------------------------------------------------------------------------------


@dataclass
class Target:
    """A backend as benchmarked: registry name, the arrays it takes, or why it cannot run."""

    name: str
    namespace: str
    device: str
    skip: str = ""


def targets(names, device):
    """The backends to run, in registry order, each with a reason if it cannot run here.

    The reference always runs on NumPy arrays on the CPU: it is the baseline.
    """
    from .. import implementations

    chosen = []
    for name, impl in implementations("dla").items():
        if names and name not in names:
            continue
        if name == "reference":
            chosen.append(Target(name, "numpy", "cpu"))
        else:
            chosen.append(Target(name, impl.namespaces[0], device, why_not(impl, device)))
    return chosen


def why_not(impl, device: str) -> str:
    """Why a registry implementation cannot be timed on ``device`` here ("" if it can)."""
    import importlib.util

    ok, why = impl.available()
    if device not in impl.devices:
        return f"runs on {'/'.join(impl.devices)}, not {device}"
    if not ok:
        return why
    if importlib.util.find_spec(impl.loader.partition(":")[0]) is None:
        return "module not written yet"
    if impl.name == "triton" and device == "cpu":
        # On a CPU Triton runs in its interpreter: a timing would measure the interpreter.
        return "interpreted on a CPU (TRITON_INTERPRET=1); timed on CUDA only"
    return ""


def entry_point(target: Target):
    """The backend's dla callable."""
    from .. import get

    return get(target.name).load()


def loglinear_entry(target: Target):
    """(callable, form): the backend's registered ``loglinear`` if any, else the reference's."""
    import dla_ref

    from .. import implementations

    table = implementations("loglinear")
    if target.name != "reference" and target.name in table:
        impl = table[target.name]
        return impl.load(), impl.loader.replace(":", ".")
    return dla_ref.loglinear, f"dla_ref.loglinear on {target.namespace}@{target.device}"


def native(arrays: dict, target: Target) -> dict:
    """NumPy inputs (and an initial Cache) as the target's float32 arrays."""
    import dla_ref

    from ..testing import to_native

    def convert(x):
        return None if x is None else to_native(x, target.namespace, target.device, "float32")

    out = {name: convert(x) for name, x in arrays.items() if name != "initial_cache"}
    if arrays.get("initial_cache") is not None:
        out["initial_cache"] = dla_ref.Cache(*(convert(x) for x in arrays["initial_cache"]))
    return out


# --- decoding: the session, or one dla() call per token ------------------------------------


def serves_decode(target: Target) -> bool:
    """Whether dla_backends.Decoder decodes on this backend (else: dla() per token)."""
    try:
        from ..decoder import DECODERS
    except ImportError:  # no decode session in this version
        return False
    return target.name in DECODERS


class CallPerToken:
    """Decoding by one ``dla`` call per token, each from the cache the last one left.

    For the backends the session does not serve (their row says so), and for the
    +merges figures, which need three runs from one given full cache.
    """

    def __init__(self, fn, options: dict, initial_cache):
        self.fn, self.options, self.cache, self.traces = fn, options, initial_cache, []

    def step(self, q, k, v, lam, *, log_alpha=None, beta=None):
        """One token: q, k [B, H, Dk], v [B, H, Dv], lam [B, H, K] -> o [B, H, Dv]."""
        at = lambda x: None if x is None else x[:, None]  # noqa: E731  [B, 1, H, ...]
        result = self.fn(at(q), at(k), at(v), at(lam), log_alpha=at(log_alpha), beta=at(beta),
                         initial_cache=self.cache, **self.options)
        self.cache = result.cache
        self.traces.append(result.trace)
        return result.o[:, 0]


def start_decoding(target: Target, options: dict, start, per_token: bool, record=True):
    """(session, o of the prompt or None): a session that has seen the start.

    start: the prompt's arrays for the session (``Decoder.prefill``), or, per_token,
    the full Cache the ``dla`` calls begin from. record: keep the trace (the check
    needs it; the timing does not).
    """
    if per_token:
        return CallPerToken(entry_point(target), options, start), None
    from ..decoder import Decoder

    session = Decoder(backend=target.name, record_trace=record, **options)
    return session, session.prefill(**start)


def as_decode_call(target: Target, per_token: bool, prompt_tokens: int):
    """A callable with dla's signature that decodes as the timing does, for the kit.

    Per token: from the given initial cache. Session: the first ``prompt_tokens``
    tokens are the prefill, each later one a step; the result covers them all.
    """
    import array_api_compat

    import dla_ref

    def decode(q, k, v, lam, *, log_alpha=None, beta=None, initial_cache=None, trace=None,
               **options):
        if trace is not None:
            raise NotImplementedError("the bench decodes by its own decisions, not a forced "
                                      "trace")
        xp = array_api_compat.array_namespace(q)
        arrays = dict(q=q, k=k, v=v, lam=lam, log_alpha=log_alpha, beta=beta)
        P = 0 if per_token else prompt_tokens
        start = initial_cache if per_token else cut(arrays, P)
        session, o_prompt = start_decoding(target, options, start, per_token)
        at = lambda x, t: None if x is None else x[:, t]  # noqa: E731
        outputs = [session.step(*(at(arrays[n], t) for n in ("q", "k", "v", "lam")),
                                log_alpha=at(log_alpha, t), beta=at(beta, t))
                   for t in range(P, q.shape[1])]
        join = lambda xs: xp.concat(xs, axis=1)  # noqa: E731
        o = xp.stack(outputs, axis=1)
        if per_token:
            return dla_ref.Result(o, session.cache, dla_ref.Trace(
                *(join([tr[f] for tr in session.traces]) for f in range(3))))
        return dla_ref.Result(join([o_prompt, o]), session.cache, session.trace)

    return decode


def decode_steps(target: Target, options: dict, start, per_token: bool):
    """(prepare, call) for timing decode: prepare opens the session on its start and
    slices the tokens (not timed); call steps through them."""

    def prepare(x):
        at = lambda name, t: None if x.get(name) is None else x[name][:, t]  # noqa: E731
        tokens = [{name: at(name, t) for name in ("q", "k", "v", "lam", "log_alpha", "beta")}
                  for t in range(x["q"].shape[1])]
        return start_decoding(target, options, start, per_token, record=False)[0], tokens

    def call(state):
        session, tokens = state
        for t in tokens:
            session.step(t["q"], t["k"], t["v"], t["lam"], log_alpha=t["log_alpha"],
                         beta=t["beta"])

    return prepare, call


# --- clocks: how one call is timed -----------------------------------------------------------


class HostClock:
    """Wall time on the host, the device waited for after the call.

    No warm-up of its own: the Timer's probe has compiled and warmed up already.
    """

    warmup = 0

    def __init__(self, sync):
        self.sync = sync

    def time_one(self, call, state) -> float:
        start = time.perf_counter()
        call(state)
        self.sync()
        return time.perf_counter() - start


class CudaClock:
    """CUDA events around the call, L2 flushed before it, one full-size warm-up call.

    event(): a new timing event (record, synchronize, elapsed_time(other) in ms);
    flush(): writes a buffer larger than the L2 cache, so that no call finds its inputs
    (or the last call's outputs) there: a kernel is timed reading from memory, as it
    would inside a model.
    """

    warmup = 1

    def __init__(self, event, flush):
        self.event, self.flush = event, flush

    def time_one(self, call, state) -> float:
        self.flush()
        start, end = self.event(), self.event()
        start.record()
        call(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def least(clock, prepare, call, x, repeat: int) -> float:
    """The least time of ``repeat`` calls of call(prepare(x)), after the clock's warm-up.

    prepare (opening a decode session, slicing tokens) is not timed. The minimum, not
    the mean: other work on the machine only ever adds time.
    """
    times = [clock.time_one(call, prepare(x)) for _ in range(clock.warmup + repeat)]
    return min(times[clock.warmup:])


def flush_bytes(l2_bytes: int) -> int:
    """Size of the L2-flushing buffer: twice the L2 cache, at least 256 MiB."""
    return max(2 * l2_bytes, 256 << 20)


def cuda_clock() -> CudaClock:
    """The CudaClock of torch's current device (torch events also time cupy's null stream)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    buffer = torch.empty(flush_bytes(getattr(props, "L2_cache_size", 0)), dtype=torch.uint8,
                         device="cuda")
    return CudaClock(lambda: torch.cuda.Event(enable_timing=True), buffer.zero_)


def clock_for(target: Target, cuda: CudaClock | None):
    """CUDA events for a CUDA target when torch can record them; else the host clock."""
    if target.device == "cuda" and cuda is not None:
        return cuda
    if target.device == "cuda" and target.namespace == "cupy":
        import cupy

        return HostClock(lambda: cupy.cuda.Device().synchronize())
    return HostClock(lambda: None)


class Timer:
    """Times calls of one target on one workload within a time budget.

    ``measure(prepare, call, arrays)`` probes on the check's tokens (which warms up and
    compiles), projects the full time, and times on the full T if that fits the budget,
    else on fewer tokens (a multiple of 64, at least the check's); returns (seconds per
    token, tokens timed).
    """

    def __init__(self, target, clock, T, check_tokens, budget, repeat):
        self.target, self.clock, self.T, self.check_tokens = target, clock, T, check_tokens
        self.budget, self.repeat = budget, repeat

    def measure(self, prepare, call, arrays, limit=None):
        T = min(self.T, limit or self.T)
        small = min(self.check_tokens, T)
        probe = least(self.clock, prepare, call, native(cut(arrays, small), self.target), 1)
        projected = probe * T / small * self.repeat
        if projected > self.budget:
            T = max(small, int(T * self.budget / projected) // 64 * 64)
        inputs = native(cut(arrays, T), self.target)
        return least(self.clock, prepare, call, inputs, self.repeat) / T, T


def matmul_rate(device: str) -> float:
    """This machine's float32 matmul throughput in flop/s (torch if installed, else NumPy)."""
    try:
        import torch
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
        a @ a
        return 2 * 2048 ** 3 / least(HostClock(lambda: None), lambda x: x, lambda x: x @ x, a, 5)
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    sync()
    return 2 * n ** 3 / least(HostClock(sync), lambda x: x, lambda x: x @ x, a, 5)


def copy_pass_seconds(target: Target, w: Workload, clock, repeat: int) -> float:
    """Seconds of one read-and-write pass over a decode cache's states, on the target.

    A copy of B H K Dk Dv float32 values between two arrays of the target's namespace
    and device: the memory traffic a decode step cannot avoid.
    """
    import numpy as np

    from ..testing import to_native

    shape = (w.B, w.H, w.K, w.D, w.D)
    src, dst = (to_native(np.ones(shape), target.namespace, target.device, "float32")
                for _ in range(2))
    if target.namespace == "numpy":
        return least(clock, lambda x: x, lambda x: np.copyto(dst, x), src, repeat + 1)
    if target.namespace == "cupy":
        import cupy

        return least(clock, lambda x: x, lambda x: cupy.copyto(dst, x), src, repeat + 1)
    return least(clock, lambda x: x, dst.copy_, src, repeat + 1)


def essential_flops(w: Workload, T: int) -> float:
    """2 T K Dk Dv + T (C + 1)(Dk + Dv) per stream, C = 64, times B H streams."""
    per_stream = 2 * T * w.K * w.D * w.D + T * (ESSENTIAL_CHUNK + 1) * 2 * w.D
    return per_stream * w.B * w.H


def cache_bytes(w: Workload) -> float:
    """Bytes of the cache read and written per decoded token: 2 K Dk Dv float32 per stream."""
    return 2 * w.K * w.D * w.D * 4 * w.B * w.H


# --- one backend on one workload, in phases ----------------------------------------------------


@dataclass
class Job:
    """One target on one workload, with its NumPy inputs.

    arrays: the T timed tokens. Decode only: prompt, the tokens a session prefills to
    fill its cache; caches, capacity -> the reference's cache after them (where
    per-token ``dla`` calls start).
    """

    target: Target
    name: str
    w: Workload
    T: int
    arrays: dict
    prompt: dict | None = None
    caches: dict = field(default_factory=dict)

    @property
    def per_token(self) -> bool:
        """Decode through dla() per token: the session does not serve this backend."""
        return not serves_decode(self.target)


def runner(job: Job, per_token: bool | None = None, **changes):
    """(prepare, call) of one figure: DLA with the workload's options, some changed."""
    options = {**dict(backbone=job.w.backbone, tau=TAU, capacity=job.w.K), **changes}
    if not job.w.decode:
        fn = entry_point(job.target)
        return (lambda x: x), (lambda x: fn(**x, **options))
    per_token = job.per_token if per_token is None else per_token
    K = options["capacity"]
    start = (native({"initial_cache": job.caches[K]}, job.target)["initial_cache"] if per_token
             else native({**job.prompt, "lam": job.prompt["lam"][..., :K]}, job.target))
    return decode_steps(job.target, options, start, per_token)


def inputs(job: Job, capacity: int) -> dict:
    """The job's timed tokens for DLA at ``capacity`` (lam's first columns)."""
    return {**job.arrays, "lam": job.arrays["lam"][..., :capacity]}


def check_case_of(job: Job, check_tokens: int):
    """The kit's Case for the job's first tokens: decode by session includes its prompt."""
    from ..testing import Case

    tokens = cut(job.arrays, check_tokens)
    start = {}
    if job.w.decode and job.per_token:
        start = dict(initial_cache=job.caches[job.w.K])
    elif job.w.decode:
        import numpy as np

        tokens = {n: None if x is None else np.concatenate([job.prompt[n], x], axis=1)
                  for n, x in tokens.items()}
    return Case(**tokens, **start, options=dict(backbone=job.w.backbone, tau=TAU,
                                                capacity=job.w.K, score="token",
                                                normalize=True, slots="oldest-first"))


def check(job: Job, check_tokens: int) -> float:
    """Phase 1: dla_backends.testing.check_case on the job's first tokens, decoded as timed.

    Returns the largest share of a tolerance budget used; raises AssertionError, or
    NotImplementedError where the backend does not support the workload.
    """
    from ..testing import Candidate, check_case

    fn = entry_point(job.target)
    if job.w.decode:
        fn = as_decode_call(job.target, job.per_token, job.w.K + 2)
    candidate = Candidate(label=f"{job.target.name}@{job.target.device}", load=lambda: fn,
                          namespace=job.target.namespace, device=job.target.device,
                          dtype="float32", state_dtype=None,
                          rebuild=f"dla bench --backends {job.target.name}")
    return check_case(candidate, check_case_of(job, check_tokens))


def time_dla(job: Job, timer: Timer, matmul: float, limit) -> dict:
    """Phase 2: DLA itself; tokens/s, and the share of matmul throughput (prefill)."""
    per_token, timed = timer.measure(*runner(job), inputs(job, job.w.K), limit)
    row = dict(T_timed=timed, seconds_per_token=per_token)
    if job.w.decode:
        return {**row, "tokens_per_s": 1 / per_token,
                "decode_GBps": cache_bytes(job.w) / per_token / 1e9,
                "decode_session": "dla() per token" if job.per_token else "Decoder"}
    return {**row, "tokens_per_s": job.w.B / per_token,
            "matmul_fraction": essential_flops(job.w, 1) / per_token / matmul}


def time_single_state(job: Job, timer: Timer, row: dict) -> dict:
    """Phase 3: the same backend at capacity 1 (the plain backbone): K30/K1."""
    per_single, _ = timer.measure(*runner(job, capacity=1), inputs(job, 1), row["T_timed"])
    return dict(K30_over_K1=row["seconds_per_token"] / per_single)


def time_decode_extras(job: Job, timer: Timer, row: dict, repeat: int) -> dict:
    """Phase 4 (decode): one copy of the cache; tau = 0.6, +inf, -inf from one full cache.

    The tau figures run dla() per token from the same given cache (a session starts
    from a prompt, and at +inf no prompt fills it). +inf never opens a slot (every token
    still transitions, scores, absorbs and reads K states); -inf opens one at every
    token, so a full cache merges at every token.
    """
    copy = copy_pass_seconds(job.target, job.w, timer.clock, repeat)
    per_tau = {tau: timer.measure(*runner(job, per_token=True, tau=tau), inputs(job, job.w.K),
                                  row["T_timed"])[0]
               for tau in (TAU, math.inf, -math.inf)}
    never = per_tau[math.inf]
    return dict(merge_overhead=per_tau[TAU] / never - 1,
                merge_overhead_worst=per_tau[-math.inf] / never - 1,
                copy_seconds=copy, step_over_copy=row["seconds_per_token"] / copy,
                loglinear_form="n/a: Log-Linear has no decode entry (no initial cache)")


def time_loglinear(job: Job, timer: Timer, row: dict) -> dict:
    """Phase 4 (prefill): Log-Linear Attention at the same T through the same backend."""
    import dla_ref

    ll, form = loglinear_entry(job.target)
    levels = {**job.arrays, "lam": job.arrays["lam"][..., :dla_ref.fenwick_levels(row["T_timed"])]}
    call = lambda x: ll(**x, backbone=job.w.backbone)  # noqa: E731
    try:
        per_ll, _ = timer.measure(lambda x: x, call, levels, row["T_timed"])
    except NotImplementedError as exc:
        return dict(loglinear_form=f"n/a: {exc}")
    return dict(DLA_over_loglinear=row["seconds_per_token"] / per_ll, loglinear_form=form)


def bench_one(job: Job, args, matmul: float, cuda, say) -> dict:
    """Check, then time one target on one workload (the phases above); returns its JSON row."""
    target = job.target
    row = dict(backend=target.name, device=target.device, workload=job.name, status="ok")
    if target.skip:
        return {**row, "status": "skipped", "reason": target.skip}
    check_tokens = min(job.T, args.check_tokens)
    if target.name != "reference" or job.w.train:  # the reference is the others' yardstick
        say(f"checking on {check_tokens} tokens")
        try:
            row["check_budget_share"] = (check_gradients if job.w.train else check)(
                job, check_tokens)
        except NotImplementedError as exc:
            return {**row, "status": "n/a", "reason": str(exc)}
        except AssertionError as exc:
            return {**row, "status": "FAILED", "reason": str(exc).splitlines()[0]}
    timer = Timer(target, clock_for(target, cuda), job.T, check_tokens, args.budget, args.repeat)
    limit = args.reference_tokens if target.name == "reference" else None
    if job.w.train:
        say("timing forward + backward, then the forward alone")
        return {**row, **time_training(job, timer, limit)}
    say("timing DLA")
    row.update(time_dla(job, timer, matmul, limit))
    say("timing the single-state backbone (K = 1)")
    row.update(time_single_state(job, timer, row))
    if job.w.decode:
        say("timing tau = +inf and -inf, and one copy of the cache")
        row.update(time_decode_extras(job, timer, row, args.repeat))
    else:
        say("timing Log-Linear")
        row.update(time_loglinear(job, timer, row))
    return row


# --- training: forward and backward through autograd -----------------------------------------


def training_jobs(args, device, name: str, w: Workload):
    """One job per backend whose registry record declares gradients, on torch tensors."""
    from .. import implementations

    T = args.tokens or (max(64, w.T // 16) if args.quick else w.T)
    arrays = piecewise_inputs(w, T, args.seed)
    for impl in implementations("dla").values():
        if impl.gradients and "torch" in impl.namespaces \
                and (not args.backends or impl.name in args.backends):
            on = "cpu" if impl.name == "reference" else device
            yield Job(Target(impl.name, "torch", on, why_not_torch(impl, on)), name, w, T, arrays)


def why_not_torch(impl, device: str) -> str:
    """why_not, with the reference (which always runs) held to the same checks."""
    return "" if impl.name == "reference" else why_not(impl, device)


def check_gradients(job: Job, check_tokens: int) -> float:
    """Phase 1 (train): dla_backends.testing.gradients.check_grads on the first tokens.

    The backward pass against ``dla_ref.vjp`` under the reference's trace; returns the
    largest share of a tolerance budget used (AssertionError on a failure).
    """
    from ..testing import get_backend
    from ..testing.gradients import check_grads

    name = job.target.name if job.target.name != "reference" else "reference/torch"
    candidate = get_backend(f"{name}@{job.target.device}:float32")
    return check_grads(candidate, check_case_of(job, check_tokens))


def training_steps(job: Job, backward: bool):
    """(prepare, call): the forward alone (under no_grad), or forward and backward."""
    import torch

    fn = entry_point(job.target)
    options = dict(backbone=job.w.backbone, tau=TAU, capacity=job.w.K)

    def leaves(x):
        return {k: v if v is None else v.detach().requires_grad_(backward) for k, v in x.items()}

    def call(x):
        if not backward:
            with torch.no_grad():
                return fn(**x, **options)
        o = fn(**x, **options).o
        o.backward(torch.ones_like(o))

    return leaves, call


def time_training(job: Job, timer: Timer, limit) -> dict:
    """Phases 2 and 3 (train): forward + backward, then the forward alone, per token."""
    both, timed = timer.measure(*training_steps(job, True), job.arrays, limit)
    forward, _ = timer.measure(*training_steps(job, False), job.arrays, timed)
    return dict(T_timed=timed, seconds_per_token=both, tokens_per_s=job.w.B / both,
                forward_seconds_per_token=forward, train_over_forward=both / forward)


# --- anchors on CUDA: flash-linear-attention's kernels at the same shapes -----------------


def fla_anchors(w: Workload, name: str, T: int, clock, repeat: int, say) -> list[dict]:
    """Rows for fla's chunked Log-Linear and single-state chunked simple-GLA (Mamba-2 form).

    Timed like the backends, on the workload's float32 inputs ([B, T, H, D], fla's layout;
    g = log alpha, zero for linear; Log-Linear's level scales = lam's first L columns,
    L = ceil(log2 T) + 1 as fla's naive form counts levels). fla's outputs are not checked
    against the reference (another parameterisation); they are anchors, not candidates.
    Where fla does not import: one row that says why.
    """
    row = dict(device="cuda", workload=name, T=T)
    try:
        from fla.ops.log_linear_attn import chunk_log_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as exc:
        say(f"fla anchors skipped: {exc}")
        return [{**row, "backend": "fla", "status": "skipped", "reason": f"no fla: {exc}"}]
    import torch

    x = {k: None if v is None else torch.tensor(v, dtype=torch.float32, device="cuda")
         for k, v in piecewise_inputs(w, T, 0).items()}
    g = x["log_alpha"] if x["log_alpha"] is not None else torch.zeros_like(x["q"][..., 0])
    L = math.ceil(math.log2(T)) + 1
    kernels = {"fla:log-linear": lambda _: chunk_log_linear_attn(
                   x["q"], x["k"], x["v"], g, x["lam"][..., :L]),
               "fla:simple-gla": lambda _: chunk_simple_gla(x["q"], x["k"], x["v"], g=g)}
    rows = []
    for label, call in kernels.items():
        try:
            seconds = least(clock, lambda x: x, call, None, repeat)
        except Exception as exc:  # an anchor's failure is reported, never fatal
            rows.append({**row, "backend": label, "status": "FAILED anchor", "reason": str(exc)})
            continue
        rows.append({**row, "backend": label, "status": "ok", "T_timed": T,
                     "seconds_per_token": seconds / T, "tokens_per_s": w.B * T / seconds})
    return rows


# --- the command ------------------------------------------------------------------------------


def add_arguments(parser):
    from .. import implementations
    from . import comma_list, count, number, output_path

    parser.add_argument("--quick", action="store_true",
                        help="T / 16 (at least 64), fewer check tokens, one repeat, 20 s "
                             "budget: a smoke test or a one-shot GPU run")
    parser.add_argument("--backends", type=comma_list(list(implementations("dla"))), default=[],
                        help=f"comma list of {', '.join(implementations('dla'))} (default: all)")
    parser.add_argument("--workloads", type=comma_list(list(WORKLOADS)), default=[],
                        help=f"comma list of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where torch/cupy backends run (default: cuda if torch sees one)")
    parser.add_argument("--json", type=output_path(""), default="dla_bench.json",
                        metavar="PATH", help="where to write the results (default dla_bench.json)")
    parser.add_argument("--tokens", type=count(1), default=None,
                        help="override T of every workload (e.g. tiny sizes in tests)")
    parser.add_argument("--check-tokens", type=count(1), default=None,
                        help="tokens of the correctness check (default 64; quick 16)")
    parser.add_argument("--reference-tokens", type=count(1), default=None,
                        help="tokens the reference is timed on (default 128; quick 32)")
    parser.add_argument("--repeat", type=count(1), default=None,
                        help="timed calls per figure, the least reported (default 3; quick 1)")
    parser.add_argument("--budget", type=number(finite=True, positive=True), default=None,
                        help="seconds one figure may take before it is timed on fewer "
                             "tokens (default 60; quick 20)")
    parser.add_argument("--seed", type=count(0), default=0)


def settle(args) -> str:
    """Fill the defaults that depend on --quick; returns the device (checked to exist)."""
    defaults = dict(check_tokens=(16, 64), reference_tokens=(32, 128), repeat=(1, 3),
                    budget=(20.0, 60.0))
    for name, (fast, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, fast if args.quick else full)
    device = args.device or ("cuda" if cuda_device() else "cpu")
    if device == "cuda" and not cuda_device():
        from . import UsageError

        raise UsageError("--device cuda: no CUDA device here (neither torch nor cupy sees one)")
    return device


def cuda_device() -> bool:
    """Whether torch or cupy sees a CUDA device."""
    from .. import get

    try:
        import torch
    except ImportError:
        return get("cupy").available()[0]
    return torch.cuda.is_available() or get("cupy").available()[0]


def jobs(args, device):
    """Every (target, workload) to run, with its inputs, workload-major."""
    chosen = targets(args.backends, device)
    for name in args.workloads or list(WORKLOADS):
        w = WORKLOADS[name]
        if w.train:
            yield from training_jobs(args, device, name, w)
            continue
        T = args.tokens or (max(64, w.T // 16) if args.quick else w.T)
        arrays = piecewise_inputs(w, T, args.seed)
        prompt = decode_prompt(w, args.seed) if w.decode else None
        caches = {K: full_cache(w, prompt, K) for K in (w.K, 1)} if w.decode else {}
        for target in chosen:
            yield Job(target, name, w, T, arrays, prompt, caches)


def run_all(args, device, matmul, say) -> list[dict]:
    """Every job's row (and on CUDA the fla anchors per prefill workload), in order."""
    todo = list(jobs(args, device))
    cuda = cuda_clock() if device == "cuda" and torch_cuda() else None
    rows = []
    for i, job in enumerate(todo, 1):
        prefix = f"[{i}/{len(todo)}] {job.target.name}@{job.target.device} {job.name} (T={job.T})"
        begun = time.perf_counter()
        row = bench_one(job, args, matmul, cuda, lambda m, p=prefix: say(f"{p}: {m}"))
        row.update(T=job.T, **{k: getattr(job.w, k) for k in ("B", "H", "D", "K", "backbone")})
        say(f"{prefix}: {row['status']} ({time.perf_counter() - begun:.1f} s)")
        rows.append(row)
        last_of_workload = i == len(todo) or todo[i].name != job.name
        if cuda is not None and last_of_workload and job.w.backbone != "gdn" and not job.w.decode:
            rows += fla_anchors(job.w, job.name, job.T, cuda, args.repeat, say)
    add_reference_ratios(rows)
    return rows


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def run(args) -> int:
    device = settle(args)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()  # other work on the machine skews timings: recorded
    say(f"dla bench: measuring float32 matmul throughput on {device}")
    matmul = matmul_rate(device)
    rows = run_all(args, device, matmul, say)
    report = make_report(args, device, matmul, rows)
    report["machine"].update(load_average_before=load_before, load_average_after=os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(table(rows, report))
    print(f"\nresults written to {args.json}")
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


def make_report(args, device, matmul, rows) -> dict:
    """The JSON document: the command, the machine, the settings, every row."""
    workloads = args.workloads or list(WORKLOADS)
    return dict(command=" ".join(sys.argv), quick=args.quick, machine=machine(device),
                versions=versions(), device=device, dtype="float32",
                matmul_GFLOPs=matmul / 1e9, tau=TAU, essential_chunk=ESSENTIAL_CHUNK,
                inputs="piecewise stationary (see dla_backends.cli.bench.piecewise_inputs)",
                workloads={n: dict(WORKLOADS[n].__dict__) for n in workloads},
                timing="CUDA events, L2 flushed" if device == "cuda" and torch_cuda()
                else "host wall clock",
                settings=dict(check_tokens=args.check_tokens,
                              reference_tokens=args.reference_tokens, repeat=args.repeat,
                              budget_s=args.budget, seed=args.seed, tokens=args.tokens),
                results=rows)


def add_reference_ratios(rows) -> None:
    """tokens/s over the reference's on the same workload (per token: the reference is
    timed on fewer tokens)."""
    reference = {r["workload"]: r["tokens_per_s"] for r in rows
                 if r["backend"] == "reference" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["workload"] in reference:
            r["over_reference"] = r["tokens_per_s"] / reference[r["workload"]]


def machine(device: str) -> dict:
    """What ran the benchmark."""
    info = dict(platform=platform.platform(), python=platform.python_version(),
                cpus=os.cpu_count(), cpu=cpu_model())
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    """Versions of the libraries that may run a backend (None: not installed)."""
    from importlib import metadata

    out = {}
    for package in ("numpy", "array-api-compat", "torch", "numba", "triton", "cupy-cuda13x",
                    "fla-core", "dla-reference"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


# --- the table: 100 columns; the detail is in the JSON -------------------------------------

WIDTH = 100
PREFILL_COLUMNS = ("backend", "workload", "T", "tok/s", "x ref", "K30/K1", "DLA/LL", "matmul")
DECODE_COLUMNS = ("backend", "T", "ms/token", "x ref", "K30/K1", "copy ms", "x copy",
                  "+merges")
TRAIN_COLUMNS = ("backend", "workload", "T", "fwd+bwd tok/s", "x ref", "x forward")


def overhead(x: float) -> str:
    """A relative overhead: '+12%', or 'within noise' where the difference is negative."""
    return "within noise" if x < 0 else f"+{x:.0%}"


def figure(row: dict, key: str, spec: str, scale: float = 1.0) -> str:
    return format(row[key] * scale, spec) if key in row else "-"


def prefill_cells(r: dict) -> list[str]:
    return [f"{r['backend']}@{r['device']}", r["workload"], str(r.get("T_timed", "-")),
            figure(r, "tokens_per_s", ".4g"), figure(r, "over_reference", ".3g"),
            figure(r, "K30_over_K1", ".3g"), figure(r, "DLA_over_loglinear", ".3g"),
            figure(r, "matmul_fraction", ".1%")]


def decode_cells(r: dict) -> list[str]:
    return [f"{r['backend']}@{r['device']}", str(r.get("T_timed", "-")),
            figure(r, "seconds_per_token", ".3g", 1e3), figure(r, "over_reference", ".3g"),
            figure(r, "K30_over_K1", ".3g"), figure(r, "copy_seconds", ".3g", 1e3),
            figure(r, "step_over_copy", ".3g"),
            overhead(r["merge_overhead"]) if "merge_overhead" in r else "-"]


def train_cells(r: dict) -> list[str]:
    return [f"{r['backend']}@{r['device']}", r["workload"], str(r.get("T_timed", "-")),
            figure(r, "tokens_per_s", ".4g"), figure(r, "over_reference", ".3g"),
            figure(r, "train_over_forward", ".3g")]


def kind(row: dict) -> str:
    """Which table a row belongs to: "prefill", "decode" or "train"."""
    w = WORKLOADS[row["workload"]]
    return "decode" if w.decode else "train" if w.train else "prefill"


def note(r: dict) -> str:
    """The row's status and reason, or what it was compared with, in a few words."""
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('reason', '')}"
    parts = [f"{r['T_timed']} of {r['T']} tokens"] if r.get("T_timed") != r.get("T") else []
    if r.get("decode_session", "Decoder") != "Decoder":
        parts.append(r["decode_session"])
    if "DLA_over_loglinear" in r and not r["loglinear_form"].startswith("dla_ref"):
        parts.append(f"LL: {r['loglinear_form'].rsplit('.', 2)[-2]}")
    return "; ".join(parts)


def render(columns, lines) -> list[str]:
    """Fixed-width rows; the last column (notes) is cut to what is left of WIDTH."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    left = WIDTH - sum(widths[:-1]) - 2 * (len(widths) - 1)  # two spaces between columns
    widths[-1] = min(widths[-1], max(len(columns[-1]), left))
    cut_to = lambda text, w: text if len(text) <= w else text[:w - 3] + "..."  # noqa: E731
    def cells(line):
        return "  ".join(cut_to(c, w).ljust(w) for c, w in zip(line, widths)).rstrip()
    return [cells(columns), cells(["-" * w for w in widths])] + [cells(line) for line in lines]


def table(rows, report) -> str:
    """The results as fixed-width text: the run's context, a prefill and a decode table."""
    gpu = f", {report['machine']['gpu']}" if "gpu" in report["machine"] else ""
    out = [f"dla bench on {report['device']} ({report['machine']['cpu']}{gpu})"[:WIDTH],
           f"float32 inputs, tau = {TAU}; matmul {report['matmul_GFLOPs']:.1f} GFLOP/s; "
           f"timing: {report['timing']}"]
    for group, columns, cells in (("prefill", PREFILL_COLUMNS, prefill_cells),
                                  ("decode", DECODE_COLUMNS, decode_cells),
                                  ("train", TRAIN_COLUMNS, train_cells)):
        chosen = [r for r in rows if kind(r) == group]
        if chosen:
            out += [""] + render(columns + ("notes",),
                                 [cells(r) + [note(r)] for r in chosen])
    return "\n".join(out)
