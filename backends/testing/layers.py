"""The two layers of docs/spec/trace.md and the calls that run them.

``check_decide`` (layer 1): the candidate's trace fits the cache and is admissible, which
makes it equal to the reference's away from ties, and obeys the rule no rounding can
change. ``check_apply`` (layer 2): under the candidate's own trace the reference gives
the same outputs, cache and scores. ``check_case`` runs a candidate on a case and both
layers; ``assert_matches_reference`` does so for any callable and its own arrays.
See docs/testing-your-kernel.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import NamedTuple

import numpy as np

import dla_ref
from dla_ref.recurrent import prepare, scan
from dla_ref.step import dla_decision, pair_density, zero_contribution
from dla_ref.validation import check_options

from .. import describe
from .arrays import to_numpy, widened, widened_record
from .backends import Candidate, candidate_for
from .budgets import budgets, score_scalars
from .cases import Case
from .tolerances import Context, Tolerance, assert_close, tolerance


def run_candidate(candidate: Candidate, case: Case) -> dla_ref.Result:
    """The candidate's Result on the case's inputs, converted to its arrays.

    NotImplementedError (the candidate declares the option combination unsupported)
    propagates: the caller reports it as not applicable. Any other exception is a
    failure (the case is valid input), reported with a reproducer.
    """
    try:
        result = candidate.load()(**case.native(candidate))
    except NotImplementedError:
        raise
    except Exception as exc:
        Context(candidate, case).fail(f"raised {type(exc).__name__}: {exc}")
    if not (isinstance(result, dla_ref.Result) and isinstance(result.cache, dla_ref.Cache)
            and isinstance(result.trace, dla_ref.Trace)):
        Context(candidate, case).fail(
            f"returned {type(result).__name__}; expected dla_ref.Result(o, Cache, Trace)")
    return result


def check_layout(candidate: Candidate, case: Case, got: dla_ref.Result) -> None:
    """Shapes, dtypes, namespace and device of every returned array (the contract).

    o [B, T, H, Dv] in the input dtype; S [B, H, K, Dk, Dv], info [B, H, K] and
    trace scores [B, T, H] in the state dtype; n [B, H, K] and m [B, H] int64;
    boundary [B, T, H] bool; merged [B, T, H] int64; all in the candidate's
    namespace and on its device.
    """
    context = Context(candidate, case)
    B, T, H = case.shape
    K, Dk, Dv = case.options["capacity"], case.q.shape[3], case.v.shape[3]
    state = state_dtype(candidate, got)
    want = {
        "o": ((B, T, H, Dv), candidate.dtype), "cache.S": ((B, H, K, Dk, Dv), state),
        "cache.n": ((B, H, K), "int64"), "cache.info": ((B, H, K), state),
        "cache.m": ((B, H), "int64"), "trace.scores": ((B, T, H), state),
        "trace.boundary": ((B, T, H), "bool"), "trace.merged": ((B, T, H), "int64"),
    }
    for name, (shape, dtype) in want.items():
        x = got.o if name == "o" else getattr(getattr(got, name.split(".")[0]),
                                              name.split(".")[1])
        namespace, device, got_dtype = describe(x)
        if (namespace, device) != (candidate.namespace, candidate.device):
            context.fail(f"{name} is a {namespace} array on {device}; expected "
                         f"{candidate.namespace} on {candidate.device}")
        if tuple(x.shape) != shape or got_dtype != dtype:
            context.fail(f"{name} is {got_dtype} {list(x.shape)}; expected {dtype} {list(shape)}")


def trace_to_numpy(trace: dla_ref.Trace) -> dla_ref.Trace:
    return dla_ref.Trace(*(to_numpy(x) for x in trace))


class Margins(NamedTuple):
    """How clear each of the reference's own decisions was, [B, T, H] each.

    score    |I_t - tau| where the boundary was a free decision (m > 0, K >= 2), else inf
    density  second-smallest minus smallest pair density where a merge happened, else inf
    """

    score: np.ndarray
    density: np.ndarray


def decision_margins(case: Case) -> tuple[dla_ref.Trace, Margins]:
    """The reference's own trace on the case, and how clear each decision was.

    It replays the reference's scan (dla_ref internals) with DLA's decision rule,
    recording the distance of each free score from tau and the gap between the two
    least dense pairs at each merge.
    """
    opts = check_options(eps=dla_ref.Options.eps, **case.options)
    args = case.arguments()
    xp, (B, T, H), tokens, cache = prepare(
        args["q"], args["k"], args["v"], args["lam"], args["log_alpha"], args["beta"],
        opts, args["initial_cache"], None)
    own = dla_decision(xp, opts)
    score_gaps, density_gaps = [], []

    def decide_at(t):
        def decide(score, m, n, info, silent):
            boundary, merged = own(score, m, n, info, silent)
            free = (m > 0) & (opts.capacity > 1) & ~silent  # a zero contribution is absorbed
            score_gaps.append(np.where(free, np.abs(score - opts.tau), np.inf))
            density_gaps.append(np.where(merged >= 0, second_gap(pair_density(xp, n, info)),
                                         np.inf))
            return boundary, merged
        return decide

    _, _, (scores, boundary, merged) = scan(xp, tokens, cache, opts, decide_at)
    layout = lambda x: np.transpose(np.reshape(x, (B, H, T)), (0, 2, 1))  # noqa: E731
    trace = dla_ref.Trace(layout(scores), layout(boundary), layout(merged))
    gaps = (layout(np.stack(g, axis=1)) for g in (score_gaps, density_gaps))
    return trace, Margins(*gaps)


def second_gap(density: np.ndarray) -> np.ndarray:
    """Second-smallest minus smallest entry per row ([N, P] -> [N]; inf if P < 2)."""
    if density.shape[1] < 2:
        return np.full(density.shape[0], np.inf)
    two = np.sort(density, axis=1)[:, :2]
    with np.errstate(invalid="ignore"):  # inf - inf in caches not full, where no merge reads it
        return two[:, 1] - two[:, 0]


def check_decide(candidate: Candidate, case: Case, got: dla_ref.Result) -> None:
    """Layer 1 of docs/spec/trace.md: the candidate's decisions (``case`` as given to it).

    - A forced trace: the returned boundary and merged equal it.
    - Otherwise: the trace fits the cache and is admissible (``dla_ref.check_trace``),
      and the rules no rounding can change hold exactly (``check_exact_rules``).

    Admissibility implies docs/spec/trace.md's "away from ties the traces are equal": up
    to the first decision where the two differ, the replay runs through the reference's own
    states, so there the candidate's decision is admissible only if the reference's
    score lies within the tolerance of tau (or its two least dense pairs within it of
    each other), i.e. only where ``decision_margins`` says the decision is not clear.

    The tolerance is the candidate's score budget at max(1, the largest score of the
    reference's run) (``decision_tolerance``): scores are O(1) when normalized,
    unbounded when not.
    """
    context = Context(candidate, case)
    trace = trace_to_numpy(got.trace)
    if case.trace is not None:
        assert_close(got.trace.boundary, case.trace.boundary, 0, "forced trace.boundary", context)
        assert_close(got.trace.merged, case.trace.merged, 0, "forced trace.merged", context)
        return
    tol = decision_tolerance(candidate, case, got)
    args = {name: value for name, value in case.arguments().items() if name != "trace"}
    try:
        miss = dla_ref.check_trace(**args, trace=trace, score_tol=tol, density_tol=tol)
    except ValueError as exc:
        context.fail(f"its trace does not fit the cache: {exc}")
    if miss is not None:
        context.fail(f"{miss} (tolerance {tol:g})")
    check_exact_rules(context, case, trace)


def check_exact_rules(context: Context, case: Case, trace: dla_ref.Trace) -> None:
    """The rules no rounding can change (docs/spec/information-score.md), exactly:

    - a zero contribution (beta_t = 0, k_t = 0 or v_t = 0, tested on the inputs) at a
      non-empty cache is absorbed: no boundary, I_t = 0;
    - every I_t >= 0, and I_t <= 2 when normalized (the clamp);
    - with tau <= 0 and K >= 2 every other token opens a slot (the rule is I_t >= tau;
      a tolerance would let a '>' slip through).
    """
    opts = case.options
    silent = zero_contribution(np, case.k, case.v, case.beta, opts["backbone"])
    started = np.zeros(case.shape, dtype=bool)  # [B, T, H]: the cache is not empty before t
    started[:, 1:] = True
    if case.initial_cache is not None:
        started |= (case.initial_cache.m > 0)[:, None, :]
    absorbed = silent & started
    high = 2.0 if opts["normalize"] else np.inf
    rules = [
        (absorbed & (trace.boundary | (trace.scores != 0)),
         "its contribution is exactly zero, so it must be absorbed (no boundary, I_t = 0)"),
        (~((trace.scores >= 0) & (trace.scores <= high)),
         f"its score is outside [0, {high:g}]"),
    ]
    if opts["tau"] <= 0 and opts["capacity"] >= 2:
        rules.append((~absorbed & ~trace.boundary,
                      f"tau = {opts['tau']} <= 0 and every score is >= 0, so it must open a "
                      "slot (the rule is I_t >= tau)"))
    for broken, why in rules:
        if broken.any():
            b, t, h = min(np.argwhere(broken).tolist(), key=lambda i: (i[1], i[0], i[2]))
            context.fail(f"token t={t}, b={b}, h={h}: {why} (score {trace.scores[b, t, h]!r}, "
                         f"boundary {bool(trace.boundary[b, t, h])})")


def decision_tolerance(candidate: Candidate, case: Case, got: dla_ref.Result) -> float:
    """The largest score budget of the reference's own run (``budgets``), and at least
    the row's ``ScoreBound`` at max(1, its largest score): a pair density is a mean of
    scores, so its error is within the budget of the largest."""
    want = dla_ref.dla(**case.arguments())
    tol = candidate_tolerance(candidate, got)
    scores, _ = budgets(tol, state_dtype(candidate, got), case, want, want.trace,
                        score_scalars(candidate))
    largest = max(1.0, float(np.max(np.abs(want.trace.scores), initial=0.0)))
    return max(float(np.max(scores, initial=0.0)), float(tol.score.of_scores(largest)))


def state_dtype(candidate: Candidate, got: dla_ref.Result) -> str:
    """The candidate's state dtype (an undeclared one is read from its S)."""
    return candidate.state_dtype or describe(got.cache.S)[2]


def candidate_tolerance(candidate: Candidate, got: dla_ref.Result) -> Tolerance:
    """The tolerance row for the candidate."""
    return tolerance(state_dtype(candidate, got), candidate.dtype)


def check_apply(candidate: Candidate, case: Case, got: dla_ref.Result) -> float:
    """Layer 2 of docs/spec/trace.md: under the candidate's own trace, the reference agrees.

    Replays the candidate's trace (boundary, merged) through ``dla_ref.dla`` on the
    same inputs and compares: o and cache.S within the values tolerance; trace
    scores and cache.info (a sum of n scores) within their budgets (``budgets``: the
    error bound of the score for the state dtype, token by token, and the row's
    ``ScoreBound``); cache.n, cache.m exactly. Returns the largest share of a budget used.
    """
    context = Context(candidate, case)
    tol = candidate_tolerance(candidate, got)
    trace = trace_to_numpy(got.trace)
    try:
        want = dla_ref.dla(**{**case.arguments(), "trace": trace})
    except ValueError as exc:
        context.fail(f"its trace does not fit the cache: {exc}")
    values = lambda x: tol.atol + tol.rtol * (np.max(np.abs(x)) if x.size else 0)  # noqa: E731
    scores, info = budgets(tol, state_dtype(candidate, got), case, want, trace,
                          score_scalars(candidate))
    shares = [
        assert_close(got.o, want.o, values(want.o), "o", context),
        assert_close(got.cache.S, want.cache.S, values(want.cache.S), "cache.S", context),
        assert_close(got.cache.n, want.cache.n, 0, "cache.n", context),
        assert_close(got.cache.m, want.cache.m, 0, "cache.m", context),
        assert_close(got.trace.scores, want.trace.scores, scores, "trace.scores", context),
        assert_close(got.cache.info, want.cache.info, info, "cache.info", context),
    ]
    return max(shares)


def check_case(candidate: Candidate, case: Case) -> float:
    """Run the candidate on the case and check its layout, decisions and values.

    The reference sees the inputs exactly as the candidate received them (rounded to
    its dtype). Returns the largest share of a tolerance budget used; raises
    AssertionError on any failure and NotImplementedError when the candidate does not
    support the case's options.
    """
    given = case.as_given_to(candidate)
    got = run_candidate(candidate, case)
    check_layout(candidate, given, got)
    check_decide(candidate, given, got)
    return check_apply(candidate, given, got)


def assert_matches_reference(fn: Callable, q, k, v, lam, *, state_dtype: str | None = None,
                             **options) -> float:
    """Check any callable with the dla signature against ``dla_ref.dla``.

    q, k, v, lam (and log_alpha, beta, trace, initial_cache in ``options``) are the
    arrays the callable takes, in its namespace, device and dtype; ``options`` are
    the keyword arguments of ``dla_ref.dla``. ``state_dtype`` ("float32", ...) is the
    dtype it keeps S, info and scores in; if None it is read from its result. Runs
    the decide and apply layers (``check_case``) and returns the largest share of a
    tolerance budget used; raises AssertionError with a reproducer on failure.
    """
    return check_case(candidate_for(fn, q, state_dtype), case_from_arrays(q, k, v, lam, options))


def case_from_arrays(q, k, v, lam, options: dict) -> Case:
    """A Case (float64 NumPy) of a caller's arrays and the keyword arguments of ``dla``.

    log_alpha, beta, trace and initial_cache are taken out of ``options`` (which is
    consumed); the rest must be options of ``dla_ref.dla`` (TypeError naming the others)
    and fill in its defaults. What ``assert_matches_reference`` and
    ``assert_grads_match_reference`` check.
    """
    arrays = dict(q=q, k=k, v=v, lam=lam, log_alpha=options.pop("log_alpha", None),
                  beta=options.pop("beta", None))
    records = {name: options.pop(name, None) for name in ("trace", "initial_cache")}
    defaults = {f.name: f.default for f in fields(dla_ref.Options) if f.name != "eps"}
    if set(options) - set(defaults):
        raise TypeError(f"unexpected options {sorted(set(options) - set(defaults))}")
    return Case(**{name: widened(x) for name, x in arrays.items()},
                options={**defaults, **options}, trace=widened_record(records["trace"]),
                initial_cache=widened_record(records["initial_cache"]))
