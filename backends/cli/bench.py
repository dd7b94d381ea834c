"""The benchmark workloads of DESIGN.md on every available backend: checked, then timed.

    dla bench                          every backend, every workload (minutes)
    dla bench --quick                  T / 16: a smoke test, or a one-shot GPU run
    dla bench --backends torch-chunked,numba --workloads prefill-mamba2 --json out.json

Workloads (d = Dk = Dv, K = capacity, tau = 0.6, float32 inputs):

    decode          B=1 H=8 T=2048 d=64 K=30 mamba2  token by token: T calls of one
                                                     token, each from the last cache
    prefill-mamba2  B=2 H=8 T=4096 d=64 K=30 mamba2  one call
    prefill-linear  B=2 H=8 T=4096 d=64 K=30 linear  one call
    gdn             B=1 H=4 T=1024 d=64 K=30 gdn     one call

Inputs are piecewise stationary, so that boundaries are where they would be on real
activations (and not at every token, as on white noise): each stream is cut into
segments of 32 to 95 tokens; a segment's keys and values are unit vectors within
about 0.02 of its own random direction; queries N(0, 1/d), lambda U(0, 1), log alpha
U(-0.1, 0), beta U(0, 1). Decoding starts from a full cache (K slots in use): the
state after a prompt of K + 2 white-noise tokens, every one of which opens a slot.

For each backend and workload, in order:
1. check: the first ``--check-tokens`` tokens go through dla_backends.testing.check_case
   (the trace is admissible and, under it, outputs and cache match the reference
   within the tolerance of the backend's state dtype). A backend that fails is not timed.
2. time: the least of ``--repeat`` calls after a warm-up (other work on a shared
   machine only adds time). A backend whose projected
   time exceeds ``--budget`` seconds is timed on fewer tokens and reported per token
   (the note says on how many); so is the reference, always (``--reference-tokens``).

Figures, all from this run:
    tok/s     B * T / seconds (decode: T / seconds, one token per call)
    x ref     tokens/s over the NumPy reference's (dla_ref.dla on NumPy arrays, which
              computes in float64)
    K30/K1    seconds of DLA (K = 30) over the single-state backbone (capacity 1, one
              lambda column) through the same backend: the price of K states
    DLA/LL    seconds of DLA over Log-Linear Attention at the same T: the backend
              module's own ``loglinear`` if it has one, else dla_ref.loglinear run on the
              backend's array namespace and device (the notes say which)
    matmul    prefill: essential flops / seconds / this machine's matmul flop rate,
              measured here (torch.matmul, float32, 2048^3 on a CPU, 8192^3 on a GPU).
              Essential flops per stream: 2 T K Dk Dv (the readout of K states) plus
              T (C + 1)(Dk + Dv) (the intra-chunk products of a chunk C = 64 form)
    decode    +merges: seconds at tau = 0.6 over seconds at tau = +inf - 1, both from
              the same full cache: tau = +inf never opens a slot, so every token still
              transitions, scores (J needs I_t), absorbs and reads K states, but never
              opens or merges one; this isolates the boundary and merge work. Its
              worst case (JSON merge_overhead_worst): tau = -inf, where every token
              opens a slot in a full cache, so merges one pair.
              GB/s: the cache read and written per token (2 K Dk Dv 4 bytes per
              stream) over the seconds per token.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

# --- the workloads and their inputs --------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration (DESIGN.md, "Performance")."""

    B: int
    H: int
    T: int
    D: int
    K: int
    backbone: str
    decode: bool = False


WORKLOADS = {
    "decode": Workload(1, 8, 2048, 64, 30, "mamba2", decode=True),
    "prefill-mamba2": Workload(2, 8, 4096, 64, 30, "mamba2"),
    "prefill-linear": Workload(2, 8, 4096, 64, 30, "linear"),
    "gdn": Workload(1, 4, 1024, 64, 30, "gdn"),
}
TAU = 0.6
ESSENTIAL_CHUNK = 64


def piecewise_inputs(w: Workload, T: int, seed: int) -> dict:
    """q, k, v, lam (and log_alpha, beta) for T tokens: NumPy float64 holding float32 values.

    Rounded through float32, so that the reference checks the very numbers the backends
    are given. See the module docstring for the distribution.
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
    return {name: None if x is None else x.astype(np.float32).astype(np.float64)
            for name, x in arrays.items()}


def full_cache(w: Workload, capacity: int, seed: int):
    """The reference's cache after a prompt of K + 2 white-noise tokens (float32 values).

    Every such token opens a slot (its score is about sqrt(2) > tau), so the cache is
    full, and has merged twice, when decoding starts.
    """
    import numpy as np

    import dla_ref

    rng = np.random.default_rng(seed + 1)
    P = w.K + 2
    shape = (w.B, P, w.H)
    prompt = dict(q=rng.standard_normal(shape + (w.D,)), k=rng.standard_normal(shape + (w.D,)),
                  v=rng.standard_normal(shape + (w.D,)), lam=rng.random(shape + (capacity,)),
                  log_alpha=None if w.backbone == "linear" else -0.1 * rng.random(shape),
                  beta=rng.random(shape) if w.backbone == "gdn" else None)
    cache = dla_ref.dla(**prompt, backbone=w.backbone, capacity=capacity, tau=TAU).cache
    as32 = lambda x: x.astype(np.float32).astype(np.float64)  # noqa: E731
    return dla_ref.Cache(as32(cache.S), cache.n, as32(cache.info), cache.m)


def cut(arrays: dict, T: int) -> dict:
    """The first T tokens of every per-token input (an initial cache is kept whole)."""
    return {name: x if x is None or name == "initial_cache" else x[:, :T]
            for name, x in arrays.items()}


# --- the backends ------------------------------------------------------------------------------


@dataclass
class Target:
    """A backend as benchmarked: registry implementation, arrays it takes, or why not."""

    name: str
    namespace: str
    device: str
    skip: str = ""


def targets(names, device):
    """The backends to run, in registry order, each with a reason if it cannot run here.

    The reference always runs on NumPy arrays on the CPU: it is the baseline.
    """
    import importlib.util

    from .. import implementations

    table = implementations("dla")
    unknown = [n for n in names or () if n not in table]
    if unknown:
        raise SystemExit(f"dla bench: unknown backend(s) {unknown}; known: {list(table)}")
    chosen = []
    for name, impl in table.items():
        if names and name not in names:
            continue
        if name == "reference":
            chosen.append(Target(name, "numpy", "cpu"))
            continue
        target = Target(name, impl.namespaces[0], device)
        ok, why = impl.available()
        if device not in impl.devices:
            target.skip = f"runs on {'/'.join(impl.devices)}, not {device}"
        elif not ok:
            target.skip = why
        elif importlib.util.find_spec(impl.loader.partition(":")[0]) is None:
            target.skip = "module not written yet"
        elif name == "triton" and device == "cpu":
            # On a CPU Triton runs in its interpreter: a timing would measure the interpreter.
            target.skip = "interpreted on a CPU (TRITON_INTERPRET=1); timed on CUDA only"
        chosen.append(target)
    return chosen


def entry_point(target: Target):
    """The backend's dla callable."""
    from .. import get

    return get(target.name).load()


def loglinear_entry(target: Target):
    """(callable, form): the backend module's own ``loglinear`` if any, else the reference's."""
    import importlib

    import dla_ref

    from .. import get

    module = importlib.import_module(get(target.name).loader.partition(":")[0])
    if target.name != "reference" and hasattr(module, "loglinear"):
        return module.loglinear, f"{module.__name__}.loglinear"
    return dla_ref.loglinear, f"dla_ref.loglinear on {target.namespace}@{target.device}"


def token_by_token(fn):
    """Decoding through ``fn``: one call per token, each from the cache the last one left.

    Same signature and result as dla (o and the trace concatenated over the calls),
    so that dla_backends.testing checks the decode loop as it is timed.
    """
    import array_api_compat

    import dla_ref

    def decode(q, k, v, lam, *, log_alpha=None, beta=None, trace=None, initial_cache=None,
               **options):
        xp = array_api_compat.array_namespace(q)
        at = lambda x, t: None if x is None else x[:, t:t + 1]  # noqa: E731
        cache, outputs, traces = initial_cache, [], []
        for t in range(q.shape[1]):
            forced = None if trace is None else dla_ref.Trace(*(at(x, t) for x in trace))
            step = fn(at(q, t), at(k, t), at(v, t), at(lam, t), log_alpha=at(log_alpha, t),
                      beta=at(beta, t), trace=forced, initial_cache=cache, **options)
            cache = step.cache
            outputs.append(step.o)
            traces.append(step.trace)
        join = lambda xs: xp.concat(xs, axis=1)  # noqa: E731
        return dla_ref.Result(join(outputs), cache,
                              dla_ref.Trace(*(join([tr[f] for tr in traces]) for f in range(3))))

    return decode


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


def synchronizer(target: Target):
    """A function that waits for the target's device to finish its queued work."""
    if target.device == "cuda" and target.namespace == "torch":
        import torch

        return torch.cuda.synchronize
    if target.namespace == "cupy":
        import cupy

        return lambda: cupy.cuda.Device().synchronize()
    return lambda: None


# --- checking and timing -------------------------------------------------------------------------


def check(target: Target, w: Workload, arrays: dict) -> float:
    """dla_backends.testing.check_case on the target (token by token for decode).

    Returns the largest share of a tolerance budget used; raises AssertionError,
    or NotImplementedError where the backend does not support the workload.
    """
    from ..testing import Candidate, Case, check_case

    fn = entry_point(target)
    if w.decode:
        fn = token_by_token(fn)
    candidate = Candidate(label=f"{target.name}@{target.device}", load=lambda: fn,
                          namespace=target.namespace, device=target.device, dtype="float32",
                          state_dtype=None, rebuild=f"dla bench --backends {target.name}")
    tokens = {k: v for k, v in arrays.items() if k != "initial_cache"}
    case = Case(**tokens, initial_cache=arrays.get("initial_cache"),
                options=dict(backbone=w.backbone, tau=TAU, capacity=w.K, score="token",
                             normalize=True, slots="oldest-first"))
    return check_case(candidate, case)


def seconds(call, sync, repeat: int) -> float:
    """The least wall time of ``repeat`` calls, each waited for on the device.

    The minimum, not the mean: on a shared machine other work only ever adds time.
    """
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


class Timer:
    """Times calls of one target on one workload within a time budget.

    ``measure(run, arrays)`` warms up on the check's tokens, projects the full time,
    and times on the full T if that fits the budget, else on fewer tokens (a
    multiple of 64, at least the check's); returns (seconds per token, tokens timed).
    """

    def __init__(self, target, T, check_tokens, budget, repeat):
        self.sync = synchronizer(target)
        self.target, self.T, self.check_tokens = target, T, check_tokens
        self.budget, self.repeat = budget, repeat

    def measure(self, run, arrays, limit=None):
        T = min(self.T, limit or self.T)
        small = min(self.check_tokens, T)
        probe = seconds(lambda: run(native(cut(arrays, small), self.target)), self.sync, 1)
        projected = probe * T / small * self.repeat
        if projected > self.budget:
            T = max(small, int(T * self.budget / projected) // 64 * 64)
        inputs = native(cut(arrays, T), self.target)
        return seconds(lambda: run(inputs), self.sync, self.repeat) / T, T


def matmul_rate(device: str) -> float:
    """This machine's float32 matmul throughput in flop/s (torch if installed, else NumPy)."""
    try:
        import torch
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
        a @ a
        return 2 * 2048 ** 3 / seconds(lambda: a @ a, lambda: None, 5)
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    sync()
    return 2 * n ** 3 / seconds(lambda: a @ a, sync, 5)


def essential_flops(w: Workload, T: int) -> float:
    """2 T K Dk Dv + T (C + 1)(Dk + Dv) per stream, C = 64, times B H streams."""
    per_stream = 2 * T * w.K * w.D * w.D + T * (ESSENTIAL_CHUNK + 1) * 2 * w.D
    return per_stream * w.B * w.H


def cache_bytes(w: Workload) -> float:
    """Bytes of the cache read and written per decoded token: 2 K Dk Dv float32 per stream."""
    return 2 * w.K * w.D * w.D * 4 * w.B * w.H


# --- one backend on one workload ---------------------------------------------------------------


def bench_one(target: Target, name: str, w: Workload, T: int, args, arrays, caches, matmul,
              say) -> dict:
    """Check, then time one target on one workload; returns its JSON row.

    arrays: the workload's NumPy inputs (T tokens); caches: capacity -> the full
    initial Cache decoding starts from (decode only); matmul: flop/s.
    """
    import dla_ref

    row = dict(backend=target.name, device=target.device, workload=name, status="ok")
    if target.skip:
        return {**row, "status": "skipped", "reason": target.skip}
    fn = entry_point(target)
    run = token_by_token(fn) if w.decode else fn
    options = dict(backbone=w.backbone, tau=TAU, capacity=w.K)
    start = (lambda K: {"initial_cache": caches[K]}) if w.decode else (lambda K: {})
    check_tokens = min(T, args.check_tokens)
    if target.name != "reference":  # the reference is what the others are checked against
        say(f"checking on {check_tokens} tokens")
        try:
            row["check_budget_share"] = check(target, w, {**cut(arrays, check_tokens),
                                                          **start(w.K)})
        except NotImplementedError as exc:
            return {**row, "status": "n/a", "reason": str(exc)}
        except AssertionError as exc:
            return {**row, "status": "FAILED", "reason": str(exc).splitlines()[0]}

    timer = Timer(target, T, check_tokens, args.budget, args.repeat)
    limit = args.reference_tokens if target.name == "reference" else None
    say("timing DLA")
    per_token, timed = timer.measure(lambda x: run(**x, **options),
                                     {**arrays, **start(w.K)}, limit)
    row.update(T_timed=timed, seconds_per_token=per_token)
    if w.decode:
        row.update(tokens_per_s=1 / per_token, decode_GBps=cache_bytes(w) / per_token / 1e9)
    else:
        row.update(tokens_per_s=w.B / per_token,
                   matmul_fraction=essential_flops(w, 1) / per_token / matmul)

    say("timing the single-state backbone (K = 1)")
    one = {**arrays, "lam": arrays["lam"][..., :1], **start(1)}
    per_single, _ = timer.measure(lambda x: run(**x, **{**options, "capacity": 1}), one, timed)
    row["K30_over_K1"] = per_token / per_single

    if w.decode:
        say("timing tau = +inf (no boundary, no merge) and -inf (a merge at every token)")
        never, always = (timer.measure(lambda x: run(**x, **{**options, "tau": tau}),
                                       {**arrays, **start(w.K)}, timed)[0]
                         for tau in (math.inf, -math.inf))
        row.update(merge_overhead=per_token / never - 1, merge_overhead_worst=always / never - 1)
        row["loglinear_form"] = "n/a: Log-Linear has no decode entry (no initial cache)"
        return row
    ll, form = loglinear_entry(target)
    say(f"timing Log-Linear ({form})")
    levels = {**arrays, "lam": arrays["lam"][..., :dla_ref.fenwick_levels(timed)]}
    try:
        per_ll, _ = timer.measure(lambda x: ll(**x, backbone=w.backbone), levels, timed)
    except NotImplementedError as exc:
        row["loglinear_form"] = f"n/a: {exc}"
        return row
    row.update(DLA_over_loglinear=per_token / per_ll, loglinear_form=form)
    return row


# --- the command ------------------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="T / 16 (at least 64), fewer check tokens, one repeat, 20 s "
                             "budget: a smoke test or a one-shot GPU run")
    parser.add_argument("--backends", default="",
                        help="comma list of registry names (default: all)")
    parser.add_argument("--workloads", default="",
                        help=f"comma list of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where torch/cupy backends run (default: cuda if torch sees one)")
    parser.add_argument("--json", default="dla_bench.json", metavar="PATH",
                        help="where to write the results (default dla_bench.json)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="override T of every workload (e.g. tiny sizes in tests)")
    parser.add_argument("--check-tokens", type=int, default=None,
                        help="tokens of the correctness check (default 64; quick 16)")
    parser.add_argument("--reference-tokens", type=int, default=None,
                        help="tokens the reference is timed on (default 128; quick 32)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed calls per figure, the least reported (default 3; quick 1)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds one figure may take before it is timed on fewer "
                             "tokens (default 60; quick 20)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    quick = args.quick
    defaults = dict(check_tokens=(16, 64), reference_tokens=(32, 128), repeat=(1, 3),
                    budget=(20.0, 60.0))
    for field, (fast, full) in defaults.items():
        if getattr(args, field) is None:
            setattr(args, field, fast if quick else full)
    device = args.device or default_device()
    names = [n for n in args.backends.split(",") if n]
    workloads = [n for n in args.workloads.split(",") if n] or list(WORKLOADS)
    unknown = [n for n in workloads if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"dla bench: unknown workload(s) {unknown}; known: {list(WORKLOADS)}")
    chosen = targets(names, device)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    load_before = os.getloadavg()  # other work on the machine skews timings: recorded
    say(f"dla bench: measuring float32 matmul throughput on {device}")
    matmul = matmul_rate(device)
    rows = []
    jobs = [(t, n) for n in workloads for t in chosen]
    for i, (target, name) in enumerate(jobs, 1):
        w = WORKLOADS[name]
        T = args.tokens or (max(64, w.T // 16) if quick else w.T)
        arrays = piecewise_inputs(w, T, args.seed)
        caches = {K: full_cache(w, K, args.seed) for K in (w.K, 1)} if w.decode else {}
        prefix = f"[{i}/{len(jobs)}] {target.name}@{target.device} {name} (T={T})"
        begun = time.perf_counter()
        row = bench_one(target, name, w, T, args, arrays, caches, matmul,
                        lambda message: say(f"{prefix}: {message}"))
        row.update(T=T, **{k: getattr(w, k) for k in ("B", "H", "D", "K", "backbone")})
        say(f"{prefix}: {row['status']} ({time.perf_counter() - begun:.1f} s)")
        rows.append(row)
    add_reference_ratios(rows)

    report = dict(command=" ".join(sys.argv), quick=quick, machine=machine(device),
                  versions=versions(),
                  device=device, dtype="float32", matmul_GFLOPs=matmul / 1e9, tau=TAU,
                  essential_chunk=ESSENTIAL_CHUNK,
                  inputs="piecewise stationary (see dla_backends.cli.bench)",
                  workloads={n: dict(WORKLOADS[n].__dict__) for n in workloads},
                  settings=dict(check_tokens=args.check_tokens,
                                reference_tokens=args.reference_tokens, repeat=args.repeat,
                                budget_s=args.budget, seed=args.seed, tokens=args.tokens),
                  results=rows)
    report["machine"].update(load_average_before=load_before, load_average_after=os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(table(rows, report))
    print(f"\nresults written to {args.json}")
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


def default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


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
        if device == "cuda":
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
                    "dla-reference"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def table(rows, report) -> str:
    """The results as a fixed-width text table, with the run's context above it."""
    head = (f"dla bench on {report['device']} ({report['machine']['cpu']}"
            + (f", {report['machine']['gpu']}" if "gpu" in report["machine"] else "")
            + f"), float32 inputs, tau = {TAU}; matmul {report['matmul_GFLOPs']:.1f} GFLOP/s")
    columns = ("backend", "workload", "T timed", "tok/s", "x ref", "K30/K1", "DLA/LL",
               "matmul", "decode", "notes")
    lines = []
    for r in rows:
        fmt = lambda key, spec: format(r[key], spec) if key in r else "-"  # noqa: E731
        decode = (f"{r['merge_overhead']:+.0%} ({r['merge_overhead_worst']:+.0%} worst), "
                  f"{r['decode_GBps']:.2f} GB/s" if "merge_overhead" in r else "-")
        notes = r.get("reason", "") if r["status"] != "ok" else r.get("loglinear_form", "")
        if r["status"] == "ok" and r.get("T_timed") != r.get("T"):
            notes = f"timed on {r['T_timed']} tokens, per token; " + notes
        lines.append((f"{r['backend']}@{r['device']}", r["workload"],
                      str(r.get("T_timed", "-")), fmt("tokens_per_s", ".4g"),
                      fmt("over_reference", ".3g"), fmt("K30_over_K1", ".3g"),
                      fmt("DLA_over_loglinear", ".3g"), fmt("matmul_fraction", ".1%"), decode,
                      (r["status"] + ": " if r["status"] != "ok" else "") + notes[:90]))
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c)
              for i, c in enumerate(columns)]
    def render(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([head, render(columns), render(["-" * w for w in widths])]
                     + [render(line) for line in lines])
