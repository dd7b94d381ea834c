"""The differential suite has teeth: deliberately broken backends fail it.

Each sabotaged backend is the reference with one function of ``dla_ref.step`` swapped
for a broken copy while it runs (the checking side keeps the real reference), or a
wrapper that mishandles the contract. Each is run on a case where its bug changes the
result, and the layer that must catch it (decide or apply, docs/spec/trace.md) is named. The same
cases pass with the reference unbroken, so what fails is the sabotage, not the case.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple
from collections.abc import Callable
from unittest import mock

import numpy as np
import pytest

import dla_ref
import dla_ref.step
from dla_backends.cli import check as dla_check
from dla_backends import cli
from dla_backends.testing import (NAMED_CASES, Candidate, CaseSpec, availability, build_case,
                                  check_apply, check_case, check_decide, reference_candidate,
                                  run_candidate)

ORIGINAL = {name: getattr(dla_ref.step, name)
            for name in ("merge_choice", "is_boundary", "slot_weights", "transition")}
CASE_OF_ISSUE_13 = "zero contribution, then a score against an empty state (gdn, Dk = 1)"
CASE_OF_ISSUE_15 = "state-mode scores of similar tokens (three-scalar cancellation)"


def reference_with(target: str, broken: Callable, dtype=None) -> Callable:
    """dla_ref.dla (computing in ``dtype``) with ``dla_ref.step.<target>`` replaced by
    ``broken`` during the call."""
    def dla(*args, **kwargs):
        with mock.patch.object(dla_ref.step, target, broken):
            return dla_ref.dla(*args, **kwargs, dtype=dtype)
    return dla


def candidate(label: str, fn: Callable, **fields) -> Candidate:
    """A NumPy float64 candidate that runs ``fn``."""
    layout = dict(namespace="numpy", device="cpu", dtype="float64", state_dtype="float64")
    return Candidate(label=f"sabotaged: {label}", load=lambda: fn,
                     rebuild=f"<the sabotaged backend {label!r} of tests/test_sabotage.py>",
                     **{**layout, **fields})


# --- the broken copies ------------------------------------------------------------------


def merge_one_pair_later(xp, n, info, m, boundary, capacity):
    """Off by one: merges pair j + 1 instead of the least dense pair j."""
    j = ORIGINAL["merge_choice"](xp, n, info, m, boundary, capacity)
    return xp.where(j >= 0, j + 1, j)


def boundary_above_tau(xp, score, m, opts):
    """'>' instead of '>=': a score exactly at tau does not open a slot."""
    return ORIGINAL["is_boundary"](xp, score, m, opts) & ((m == 0) | (score > opts.tau))


def slots_swapped(xp, lam, m, slots):
    """Reads lambda in the other slot order (newest-first for oldest-first and back)."""
    other = "newest-first" if slots == "oldest-first" else "oldest-first"
    return ORIGINAL["slot_weights"](xp, lam, m, other)


def no_transition(xp, S, k, alpha, beta, backbone):
    """Drops the transition G_t: stored states never decay."""
    return S


def never_zero(xp, k, v, beta, backbone):
    """Sees no zero contribution: a token with beta = 0 is scored and may open a slot."""
    return xp.zeros(k.shape[0], dtype=xp.bool)


def cancelling_score(xp, s, S_open, opts):
    """The score from three scalars by the expansion that cancels (issue 15):
    sqrt(r_A^2 ||A||^2 - 2 r_A r_B <A, B> + r_B^2 ||B||^2) / (r_B ||B|| + eps), clamped."""
    ss, SS, sS = (xp.sum(x * y, axis=(1, 2)) for x, y in ((s, s), (S_open, S_open), (S_open, s)))
    AA, AB = (ss, sS) if opts.score == "token" else (SS + 2 * sS + ss, SS + sS)
    size = s.shape[1] * s.shape[2]
    rA, rB = (1 / xp.sqrt(X / size + opts.eps) if opts.normalize else xp.ones_like(X)
              for X in (AA, SS))
    radicand = xp.maximum(rA * rA * AA - 2 * rA * rB * AB + rB * rB * SS, xp.zeros_like(SS))
    return dla_ref.step.clamp_score(xp, xp.sqrt(radicand) / (rB * xp.sqrt(SS) + opts.eps), opts)


def ignoring(argument: str) -> Callable:
    """The reference that drops one keyword argument (a forced trace, an initial cache)."""
    def dla(*args, **kwargs):
        kwargs.pop(argument)
        return dla_ref.dla(*args, **kwargs)
    return dla


def scores_reported_high(*args, **kwargs):
    """Decides and computes right, but reports every score 0.5% too high."""
    result = dla_ref.dla(*args, **kwargs)
    return result._replace(trace=result.trace._replace(scores=result.trace.scores * 1.005))


def float32_posing_as_float64(*args, **kwargs):
    """The reference in float32, results cast to float64: claims a precision it lacks."""
    result = dla_ref.dla(*args, **kwargs, dtype=np.float32)
    cast = lambda x: x.astype(np.float64) if x.dtype == np.float32 else x  # noqa: E731
    return dla_ref.Result(cast(result.o), dla_ref.Cache(*map(cast, result.cache)),
                          dla_ref.Trace(*map(cast, result.trace)))


class Sabotage(NamedTuple):
    candidate: Candidate
    spec: CaseSpec
    layer: str  # the layer that fails: "decide", "apply" (decisions right) or "either"
    message: str  # a regular expression the failure message must match


MERGING = CaseSpec(T=20, B=2, H=2, capacity=3, tau=0.3, seed=21)

SABOTAGES = {
    "off-by-one merge index": Sabotage(
        candidate("off-by-one merge", reference_with("merge_choice", merge_one_pair_later)),
        MERGING, "decide", "does not fit the cache|inadmissible merge"),
    "'>' instead of '>=' at tau": Sabotage(
        candidate("> at tau", reference_with("is_boundary", boundary_above_tau)),
        NAMED_CASES["score exactly at tau = 0 (repeated tokens)"], "decide",
        "must open a slot"),
    "slot order swapped": Sabotage(
        candidate("slot order swapped", reference_with("slot_weights", slots_swapped)),
        MERGING, "apply", "^[^\n]*: o differs"),
    "transition dropped": Sabotage(
        candidate("transition dropped", reference_with("transition", no_transition)),
        CaseSpec(backbone="mamba2", T=12, capacity=3, seed=22), "either", "differs|inadmissible"),
    "forced trace ignored": Sabotage(
        candidate("forced trace ignored", ignoring("trace")),
        NAMED_CASES["forced trace"], "decide", "forced trace"),
    "initial cache ignored": Sabotage(
        candidate("initial cache ignored", ignoring("initial_cache")),
        NAMED_CASES["initial cache (split sequence)"], "either",
        "differs|inadmissible|does not fit"),
    "scores reported 0.5% high": Sabotage(
        candidate("scores high", scores_reported_high), MERGING, "apply", "trace.scores differs"),
    "zero contribution scored (issue 13)": Sabotage(
        candidate("zero contribution scored", reference_with("zero_contribution", never_zero)),
        NAMED_CASES[CASE_OF_ISSUE_13], "decide", "must be absorbed|inadmissible boundary"),
    "float32 score that cancels (issue 15)": Sabotage(
        candidate("cancelling float32 score",
                  reference_with("information_score", cancelling_score, np.float32),
                  dtype="float32", state_dtype="float32"),
        NAMED_CASES[CASE_OF_ISSUE_15], "apply", "trace.scores differs"),
    "float32 claiming float64": Sabotage(
        candidate("float32 as float64", float32_posing_as_float64), MERGING, "apply",
        "differs from the reference"),
}


@pytest.mark.parametrize("name", SABOTAGES)
def test_the_suite_catches(name):
    """check_case fails for the sabotaged backend, in the layer that must catch it."""
    sabotage = SABOTAGES[name]
    case = build_case(sabotage.spec).as_given_to(sabotage.candidate)
    got = run_candidate(sabotage.candidate, case)
    layers = {"decide": check_decide, "apply": check_apply, "either": check_either}
    with pytest.raises(AssertionError, match=sabotage.message) as failure:
        layers[sabotage.layer](sabotage.candidate, case, got)
    assert "--- reproduce with ---" in str(failure.value)
    if sabotage.layer == "apply":
        check_decide(sabotage.candidate, case, got)  # its decisions are right, only values not


def check_either(candidate, case, got):
    check_decide(candidate, case, got)
    check_apply(candidate, case, got)


@pytest.mark.parametrize("name", SABOTAGES)
def test_the_same_case_passes_unbroken(name):
    """Control: the case of each sabotage passes with the real reference."""
    check_case(reference_candidate("float64"), build_case(SABOTAGES[name].spec))


def test_a_recurrent_norm_off_by_a_millionth_is_caught():
    """torch-chunked declares recurrent scalars (a larger score budget); with its
    ||S_open||^2 at the chunk start 1e-6 too large, its scores still fail."""
    pytest.importorskip("torch", reason="torch-chunked needs torch")
    from dla_backends.kernels import torch_chunked
    from dla_backends.testing import get_backend

    honest = get_backend("torch-chunked")
    real_scalars = torch_chunked.ChunkGrams.scalars

    def norm_a_millionth_high(grams, *args):
        x = real_scalars(grams, *args)
        return x._replace(start_norm=x.start_norm * (1 + 1e-6))

    def dla(*args, **kwargs):
        with mock.patch.object(torch_chunked.ChunkGrams, "scalars", norm_a_millionth_high):
            return honest.load()(*args, **kwargs)

    broken = dataclasses.replace(honest, label="sabotaged: ||B||^2 1e-6 high", load=lambda: dla)
    case = build_case(NAMED_CASES["initial cache (split sequence)"])
    check_case(honest, case)
    with pytest.raises(AssertionError, match="trace.scores differs"):
        check_apply(broken, case, run_candidate(broken, case))


def test_wrong_namespace_is_caught():
    """A torch backend that hands back NumPy arrays fails the layout check."""
    pytest.importorskip("torch", reason="torch not installed")

    def numpy_out(*args, **kwargs):
        host = lambda x: x.numpy() if hasattr(x, "numpy") else x  # noqa: E731
        return dla_ref.dla(*map(host, args), **{k: host(v) for k, v in kwargs.items()})

    torch_candidate = candidate("returns numpy", numpy_out, namespace="torch")
    with pytest.raises(AssertionError, match="is a numpy array on cpu; expected torch on cpu"):
        check_case(torch_candidate, build_case(CaseSpec()))


def test_not_applicable_is_not_a_pass():
    """NotImplementedError from a backend propagates: callers skip, never count a pass."""
    def unsupported(*args, **kwargs):
        raise NotImplementedError("no such thing here")

    with pytest.raises(NotImplementedError, match="no such thing"):
        check_case(candidate("unsupported", unsupported), build_case(CaseSpec()))


def test_dla_check_fails_for_a_sabotaged_backend(capsys):
    """``dla check``'s runner reports the failures and exits 1."""
    sabotage = SABOTAGES["slot order swapped"]
    code = dla_check.check_candidate(sabotage.candidate, seed=0, examples=4)
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in out and "reproduce" in out


def test_an_exception_is_a_failure_with_a_reproducer():
    """A backend that raises on valid input fails (AssertionError), it does not crash."""
    def crashing(*args, **kwargs):
        raise ValueError("lam contains NaN or inf")

    with pytest.raises(AssertionError, match="raised ValueError: lam contains") as failure:
        check_case(candidate("crashing", crashing), build_case(CaseSpec()))
    assert "--- reproduce with ---" in str(failure.value)


def test_values_a_dtype_cannot_hold_make_the_case_not_applicable():
    """Unnormalized scores of a zero open state are ~1/eps: a float16 cache overflows."""
    case = build_case(CaseSpec(split=4, keys="zero", normalize=False, T=4, seed=2))
    assert np.max(case.initial_cache.info) > np.finfo(np.float16).max
    with pytest.raises(NotImplementedError, match="initial_cache.info overflows float16"):
        check_case(reference_candidate("float16"), case)


def test_dla_check_passes_the_reference(capsys):
    """``dla check --backend reference`` through the command line: the table, exit 0."""
    assert cli.main(["check", "--backend", "reference", "--examples", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("named cases", "linear", "mamba2", "gdn"):
        assert row in out
    assert "passed: 0 failing case(s)" in out


@pytest.mark.parametrize("name, why", [("nope", "unknown test backend 'nope'"),
                                       ("cupy@cuda", "cannot run here")])
def test_dla_check_says_why_it_cannot_run(capsys, name, why):
    if name == "cupy@cuda" and availability(name)[0]:
        pytest.skip("cupy can run here (a CUDA device is present)")
    assert exit_code(["check", "--backend", name]) == 2
    printed = capsys.readouterr()
    assert why in printed.out + printed.err


def exit_code(argv) -> int:
    """``dla``'s exit status for ``argv``, whether main returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code
