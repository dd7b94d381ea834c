"""Behaviour of the reference (dla_ref) against docs/spec/: identities, edge rules, splitting.

Each test states the property it checks; expected values come from an independent form
(the materialized O(T^2) form, the single-state backbone, the Fenwick mask) or from the
spec's rules, never from the function under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_ref
from dla_ref import step as S
from dla_ref.records import Options

BACKBONES = ("linear", "mamba2", "gdn")


def make_inputs(seed, B=1, T=12, H=2, Dk=3, Dv=4, K=4, backbone="linear", decay=1.0):
    """Seeded inputs: dict for dla_ref.dla's first four arguments and the gates."""
    rng = np.random.default_rng(seed)
    x = dict(
        q=rng.standard_normal((B, T, H, Dk)),
        k=rng.standard_normal((B, T, H, Dk)) / np.sqrt(Dk),
        v=rng.standard_normal((B, T, H, Dv)),
        lam=rng.random((B, T, H, K)),
    )
    gates = {}
    if backbone != "linear":
        gates["log_alpha"] = -decay * rng.random((B, T, H))
    if backbone == "gdn":  # gdn's keys have unit norm (docs/spec/backbones.md)
        x["k"] = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True)
        gates["beta"] = rng.random((B, T, H))
    return x, dict(backbone=backbone, **gates)


@st.composite
def cases(draw):
    """A small case and options covering every backbone, score mode, slot order and K."""
    backbone = draw(st.sampled_from(BACKBONES))
    T = draw(st.integers(1, 14))
    K = draw(st.sampled_from([1, 2, 3, T, T + 1]))
    x, gates = make_inputs(draw(st.integers(0, 2**16)), B=draw(st.integers(1, 2)), T=T,
                           H=draw(st.integers(1, 2)), Dk=draw(st.integers(1, 4)),
                           Dv=draw(st.integers(1, 4)), K=K, backbone=backbone,
                           decay=draw(st.sampled_from([1e-3, 1.0, 20.0])))
    opts = dict(gates, capacity=K, tau=draw(st.sampled_from([0.3, 0.9, 1.3])),
                score=draw(st.sampled_from(["token", "state"])),
                normalize=draw(st.booleans()),
                slots=draw(st.sampled_from(["oldest-first", "newest-first"])))
    return x, opts


def parallel_options(opts):
    """The options dla_ref.materialized takes (it needs no scoring options)."""
    return {k: opts[k] for k in ("backbone", "log_alpha", "beta", "capacity", "slots") if k in opts}


# --- two forms that must agree (docs/spec/materialized.md) ------------------------------


@settings(max_examples=60)
@given(cases())
def test_recurrent_equals_materialized(case):
    x, opts = case
    run = dla_ref.dla(**x, **opts)
    o = dla_ref.materialized(**x, trace=run.trace, **parallel_options(opts))
    np.testing.assert_allclose(run.o, o, rtol=1e-9, atol=1e-9)


# --- conservation (docs/spec/backbones.md) ----------------------------------------------


@settings(max_examples=30)
@given(cases())
def test_slots_sum_to_the_single_state_at_every_t(case):
    x, opts = case
    T = x["q"].shape[1]
    run = dla_ref.dla(**x, **opts)
    plain = {k: opts[k] for k in ("backbone", "log_alpha", "beta") if k in opts}
    for t in (0, T // 2, T - 1):
        prefix = {k: a[:, : t + 1] for k, a in x.items()}
        gates = {k: (a[:, : t + 1] if isinstance(a, np.ndarray) else a) for k, a in plain.items()}
        part = dla_ref.dla(**prefix, **{**opts, **gates})
        single = dla_ref.single(prefix["q"], prefix["k"], prefix["v"], **gates)
        np.testing.assert_allclose(part.cache.S.sum(axis=2), single.cache.S[:, :, 0],
                                   rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(part.cache.n.sum(axis=2), t + 1)  # sum n_i = t + 1
    assert np.all(run.cache.m <= opts["capacity"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_all_lambdas_one_gives_the_plain_backbone(backbone):
    x, gates = make_inputs(1, T=20, K=3, backbone=backbone)
    x["lam"] = np.ones_like(x["lam"])
    run = dla_ref.dla(**x, **gates, capacity=3, tau=0.9)
    assert run.trace.merged.max() >= 0, "the case should exercise merges"
    single = dla_ref.single(x["q"], x["k"], x["v"], **gates)
    # the plain backbone written out: S_t = G_t S_{t-1} + s_t, o_t = q_t^T S_t
    q, k, v = x["q"][0, :, 0], x["k"][0, :, 0], x["v"][0, :, 0]
    state = np.zeros((q.shape[1], v.shape[1]))
    for t in range(q.shape[0]):
        a = np.exp(gates["log_alpha"][0, t, 0]) if backbone != "linear" else 1.0
        b = gates["beta"][0, t, 0] if backbone == "gdn" else 1.0
        G = a * (np.eye(q.shape[1]) - b * np.outer(k[t], k[t])) if backbone == "gdn" else a
        state = (G @ state if backbone == "gdn" else G * state) + b * np.outer(k[t], v[t])
        np.testing.assert_allclose(single.o[0, t, 0], q[t] @ state, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run.o, single.o, rtol=1e-9, atol=1e-9)


# --- tau and capacity edge rules (docs/spec/boundaries.md) ------------------------------


def test_tau_plus_infinity_keeps_one_state():
    x, gates = make_inputs(2, T=15, K=5)
    run = dla_ref.dla(**x, **gates, capacity=5, tau=float("inf"))
    assert run.trace.boundary[:, 0].all() and not run.trace.boundary[:, 1:].any()
    np.testing.assert_array_equal(run.cache.m, 1)


def test_tau_minus_infinity_with_room_gives_one_state_per_token():
    x, gates = make_inputs(3, T=9, K=9)
    run = dla_ref.dla(**x, **gates, capacity=9, tau=float("-inf"))
    assert run.trace.boundary.all() and (run.trace.merged == -1).all()
    np.testing.assert_array_equal(run.cache.n, 1)


def test_capacity_exceeded_by_one_merges_exactly_once():
    x, gates = make_inputs(4, T=6, K=5)
    run = dla_ref.dla(**x, **gates, capacity=5, tau=float("-inf"))
    merged = run.trace.merged
    assert (merged[:, :5] == -1).all() and (merged[:, 5] >= 0).all()
    np.testing.assert_array_equal(run.cache.m, 5)


def test_capacity_one_is_the_single_state_backbone():
    x, gates = make_inputs(5, T=10, K=1, backbone="mamba2")
    run = dla_ref.dla(**x, **gates, capacity=1, tau=float("-inf"))
    assert not run.trace.boundary[:, 1:].any()  # K = 1: only the first token opens a slot
    single = dla_ref.single(x["q"], x["k"], x["v"], **gates)
    np.testing.assert_allclose(run.o, x["lam"][..., :1] * single.o, rtol=1e-10)


def test_first_token_scores_zero_and_opens_slot_zero():
    x, gates = make_inputs(6, T=3, K=3)
    run = dla_ref.dla(**x, **gates, capacity=3, tau=10.0)
    np.testing.assert_array_equal(run.trace.scores[:, 0], 0.0)
    assert run.trace.boundary[:, 0].all()


def test_score_at_tau_is_a_boundary():
    """b_t = 1 iff I_t >= tau: set tau to the largest score of a run that never opens a slot.

    Every earlier token scores strictly less, so the run with that tau makes the same
    decisions up to t, sees the same open state, and must open a slot exactly at t.
    """
    x, gates = make_inputs(7, T=8, H=1, K=8)
    free = dla_ref.dla(**x, **gates, capacity=8, tau=float("inf"))
    t = 1 + int(np.argmax(free.trace.scores[0, 1:, 0]))
    tau = float(free.trace.scores[0, t, 0])
    run = dla_ref.dla(**x, **gates, capacity=8, tau=tau)
    assert np.flatnonzero(run.trace.boundary[0, :, 0]).tolist()[:2] == [0, t]
    assert run.trace.scores[0, t, 0] == tau


# --- merging (docs/spec/merging.md) -----------------------------------------------------


def test_exact_density_ties_merge_the_oldest_pair():
    n = np.array([[1, 1, 1, 1]])
    info = np.array([[2.0, 2.0, 2.0, 2.0]])  # every pair has density 2
    j = S.merge_choice(np, n, info, np.array([4]), np.array([True]), capacity=4)
    assert j.tolist() == [0]
    info = np.array([[5.0, 1.0, 3.0, 1.0]])  # pairs: 3, 2, 2 -> first minimum is pair 1
    j = S.merge_choice(np, n, info, np.array([4]), np.array([True]), capacity=4)
    assert j.tolist() == [1]


def test_no_merge_without_a_boundary_or_room_left():
    n, info = np.array([[1, 2, 0]]), np.array([[1.0, 1.0, 0.0]])
    assert S.merge_choice(np, n, info, np.array([2]), np.array([True]), 3).tolist() == [-1]
    n = np.array([[1, 2, 3]])
    assert S.merge_choice(np, n, info, np.array([3]), np.array([False]), 3).tolist() == [-1]


def test_merge_adjacent_sums_the_pair_and_shifts_the_rest():
    x = np.array([[1.0, 2.0, 4.0, 8.0]])
    assert S.merge_adjacent(np, x, np.array([1])).tolist() == [[1.0, 6.0, 8.0, 0.0]]
    assert S.merge_adjacent(np, x, np.array([2])).tolist() == [[1.0, 2.0, 12.0, 0.0]]
    assert S.merge_adjacent(np, x, np.array([-1])).tolist() == [[1.0, 2.0, 4.0, 8.0]]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_merge_and_transition_commute(backbone):
    rng = np.random.default_rng(8)
    Sx = rng.standard_normal((3, 4, 3, 2))
    k, alpha, beta = rng.standard_normal((3, 3)), rng.random(3), rng.random(3)
    j = np.array([0, 2, -1])
    a = S.merge_adjacent(np, S.transition(np, Sx, k, alpha, beta, backbone), j)
    b = S.transition(np, S.merge_adjacent(np, Sx, j), k, alpha, beta, backbone)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# --- readout slot orders (docs/spec/readout.md) -----------------------------------------


def test_newest_first_reverses_the_used_slots_only():
    lam = np.array([[10.0, 20.0, 30.0, 40.0]])
    w = S.slot_weights(np, lam, np.array([3]), "newest-first")
    assert w.tolist() == [[30.0, 20.0, 10.0, 0.0]]
    w = S.slot_weights(np, lam, np.array([3]), "oldest-first")
    assert w.tolist() == [[10.0, 20.0, 30.0, 0.0]]


# --- the score (docs/spec/information-score.md) -----------------------------------------


def test_score_is_the_spec_formula():
    rng = np.random.default_rng(9)
    s, Sopen = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 3, 4))
    eps = 1e-6
    R = lambda X: X / np.sqrt(np.mean(X**2) + eps)  # noqa: E731
    for mode, A in (("token", s[0]), ("state", Sopen[0] + s[0])):
        for normalize in (True, False):
            f = R if normalize else (lambda X: X)
            want = np.linalg.norm(f(A) - f(Sopen[0])) / (np.linalg.norm(f(Sopen[0])) + eps)
            got = S.information_score(np, s, Sopen, Options(score=mode, normalize=normalize))
            np.testing.assert_allclose(got, [want], rtol=1e-12)


# --- forced traces, splitting, admissibility (docs/spec/trace.md) -----------------------


@settings(max_examples=30)
@given(cases())
def test_forced_trace_reproduces_the_free_run(case):
    x, opts = case
    free = dla_ref.dla(**x, **opts)
    forced = dla_ref.dla(**x, **opts, trace=free.trace)
    np.testing.assert_array_equal(forced.o, free.o)
    for a, b in zip(forced.cache + forced.trace, free.cache + free.trace):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=30)
@given(cases(), st.integers(0, 14))
def test_splitting_a_sequence_changes_nothing(case, cut):
    x, opts = case
    T = x["q"].shape[1]
    cut = min(cut, T - 1) if T > 1 else 0
    whole = dla_ref.dla(**x, **opts)
    head = {k: a[:, :cut] for k, a in x.items()}
    tail = {k: a[:, cut:] for k, a in x.items()}
    gate = lambda part: {k: (v[:, part] if isinstance(v, np.ndarray) else v)  # noqa: E731
                         for k, v in opts.items()}
    if cut == 0:
        first = None
    else:
        first = dla_ref.dla(**head, **gate(slice(0, cut))).cache
    second = dla_ref.dla(**tail, **gate(slice(cut, T)), initial_cache=first)
    np.testing.assert_allclose(second.o, whole.o[:, cut:], rtol=1e-12, atol=1e-12)
    for a, b in zip(second.cache, whole.cache):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(second.trace.boundary, whole.trace.boundary[:, cut:])
    np.testing.assert_array_equal(second.trace.merged, whole.trace.merged[:, cut:])


@settings(max_examples=20)
@given(cases())
def test_the_references_own_trace_is_admissible(case):
    x, opts = case
    run = dla_ref.dla(**x, **opts)
    assert dla_ref.check_trace(**x, trace=run.trace, **opts) is None


def test_a_wrong_boundary_is_rejected_with_its_margin():
    x, gates = make_inputs(10, T=10, K=10)
    run = dla_ref.dla(**x, **gates, capacity=10, tau=1.5)
    free = ~run.trace.boundary[0, 1:, 0]
    t = 1 + int(np.flatnonzero(free)[0])  # a token that did not open a slot
    boundary = run.trace.boundary.copy()
    boundary[0, t, 0] = True
    merged = run.trace.merged.copy()
    bad = dla_ref.Trace(run.trace.scores, boundary, merged)
    found = dla_ref.check_trace(**x, **gates, capacity=10, tau=1.5, trace=bad)
    assert found is not None and (found.t, found.b, found.h, found.kind) == (t, 0, 0, "boundary")
    assert found.margin == pytest.approx(1.5 - 1e-6 - run.trace.scores[0, t, 0])


def test_a_wrong_merge_is_rejected():
    x, gates = make_inputs(11, T=12, K=3)
    run = dla_ref.dla(**x, **gates, capacity=3, tau=float("-inf"))
    merged = run.trace.merged.copy()
    t = 5
    merged[0, t, 0] = 1 - merged[0, t, 0]  # the other pair of K = 3
    bad = dla_ref.Trace(run.trace.scores, run.trace.boundary, merged)
    found = dla_ref.check_trace(**x, **gates, capacity=3, tau=float("-inf"), trace=bad)
    assert found is not None and (found.t, found.kind) == (t, "merge") and found.margin > 0


# --- the Fenwick baseline (docs/spec/baselines.md) --------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("T", [1, 2, 7, 16, 19])
def test_loglinear_matches_the_fenwick_mask(backbone, T):
    L = dla_ref.fenwick_levels(T)
    x, gates = make_inputs(12, T=T, K=L + 1, backbone=backbone)
    o = dla_ref.loglinear(**x, **gates)
    to = lambda a: a.transpose(0, 2, 1, *range(3, a.ndim)).reshape(-1, *a.shape[1:2], *a.shape[3:])  # noqa: E731
    N = x["q"].shape[0] * x["q"].shape[2]
    mask = dla_ref.fenwick_mask(np, to(x["lam"]))
    alpha = np.exp(to(gates["log_alpha"])) if "log_alpha" in gates else None
    beta = to(gates["beta"]) if "beta" in gates else None
    want = dla_ref.masked_form(np, to(x["q"]), to(x["k"]), to(x["v"]), mask, alpha, beta, backbone)
    got = to(o)
    assert got.shape[0] == N
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_fenwick_levels_are_aligned_power_of_two_blocks():
    """At time t, level l >= 1 holds 2^(l-1) tokens iff bit l-1 of t is set, else none."""
    from dla_ref.fenwick import level

    for t in range(40):
        sizes = {}
        for s in range(t + 1):
            sizes[level(t, s)] = sizes.get(level(t, s), 0) + 1
        assert sizes.pop(0) == 1
        assert sizes == {b + 1: 2**b for b in range(t.bit_length()) if t >> b & 1}


# --- the fixed baseline and the partition history ---------------------------------------


def test_fixed_opens_a_slot_every_chunk_tokens_and_splits_cleanly():
    x, gates = make_inputs(13, T=11, K=3)
    run = dla_ref.fixed(**x, **gates, chunk=3, capacity=3)
    assert np.flatnonzero(run.trace.boundary[0, :, 0]).tolist() == [0, 3, 6, 9]
    head = {k: a[:, :4] for k, a in x.items()}
    tail = {k: a[:, 4:] for k, a in x.items()}
    first = dla_ref.fixed(**head, chunk=3, capacity=3)
    second = dla_ref.fixed(**tail, chunk=3, capacity=3, initial_cache=first.cache)
    np.testing.assert_array_equal(second.trace.boundary, run.trace.boundary[:, 4:])


def test_slot_starts_follow_boundaries_and_merges():
    T = 6
    boundary = np.ones((1, T, 1), dtype=bool)
    merged = np.array([-1, -1, -1, 0, 1, 0])[None, :, None]
    starts = dla_ref.slot_starts(dla_ref.Trace(np.zeros((1, T, 1)), boundary, merged), 3)
    assert starts[0, :, 0].tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2],
                                        [0, 2, 3], [0, 2, 4], [0, 4, 5]]


# --- Theorem 3.1 ------------------------------------------------------------------------


def test_deviation_bound_holds_and_is_zero_for_constant_blocks():
    rng = np.random.default_rng(14)
    u = rng.standard_normal((12, 5))
    q = rng.standard_normal(5)
    starts = np.array([0, 4, 9])
    assert dla_ref.deviation(u, starts, q) <= dla_ref.deviation_bound(u, starts, q) + 1e-12
    const = np.repeat(rng.standard_normal((3, 5)), [4, 5, 3], axis=0)
    assert dla_ref.deviation_bound(const, starts) == pytest.approx(0.0, abs=1e-12)


# --- conveniences: lam broadcasting, the partition, dtypes, the backend's name ----------


@st.composite
def lam_shapes(draw, B, T, H, K):
    """A shape that broadcasts to [B, T, H, K]: a suffix of it, each axis kept or set to 1."""
    full = (B, T, H, K)
    rank = draw(st.integers(0, 4))
    return tuple(draw(st.sampled_from([n, 1])) for n in full[4 - rank:])


@settings(max_examples=40)
@given(cases(), st.data())
def test_lam_of_any_broadcasting_shape_equals_the_full_array(case, data):
    x, opts = case
    B, T, H, K = x["lam"].shape
    shape = data.draw(lam_shapes(B, T, H, K))
    small = np.random.default_rng(sum(shape)).random(shape)
    full = dict(x, lam=np.broadcast_to(small, (B, T, H, K)).copy())
    want = dla_ref.dla(**full, **opts)
    got = dla_ref.dla(**dict(x, lam=small), **opts)
    np.testing.assert_array_equal(got.o, want.o)
    np.testing.assert_array_equal(got.trace.boundary, want.trace.boundary)
    o = dla_ref.materialized(**dict(x, lam=small), trace=want.trace, **parallel_options(opts))
    np.testing.assert_allclose(o, want.o, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_omitted_lam_means_all_ones(backbone):
    x, gates = make_inputs(20, T=9, K=3, backbone=backbone)
    ones = dict(x, lam=np.ones_like(x["lam"]))
    no_lam = {k: a for k, a in x.items() if k != "lam"}
    for run in (dla_ref.dla, lambda **kw: dla_ref.fixed(**kw, chunk=2)):
        np.testing.assert_array_equal(run(**no_lam, **gates, capacity=3).o,
                                      run(**ones, **gates, capacity=3).o)
    L = dla_ref.fenwick_levels(9)
    levels = np.ones(x["lam"].shape[:3] + (L,))
    np.testing.assert_array_equal(dla_ref.loglinear(**no_lam, **gates),
                                  dla_ref.loglinear(**dict(x, lam=levels), **gates))
    per_head = np.random.default_rng(0).random((x["q"].shape[2], L))  # [H, L] constants
    np.testing.assert_array_equal(
        dla_ref.loglinear(**dict(x, lam=per_head), **gates),
        dla_ref.loglinear(**dict(x, lam=np.broadcast_to(per_head, levels.shape)), **gates))


def blocks_by_hand(boundary, merged):
    """The start tokens of the final blocks of one stream, replaying its trace on a list."""
    starts = []
    for t, (b, j) in enumerate(zip(boundary.tolist(), merged.tolist())):
        if j >= 0:
            del starts[j + 1]
        if b:
            starts.append(t)
    return starts


@settings(max_examples=40)
@given(cases())
def test_partition_gives_the_final_blocks_and_each_tokens_block(case):
    x, opts = case
    run = dla_ref.dla(**x, **opts)
    part = dla_ref.partition(run)
    B, T, H, K = x["lam"].shape
    assert part.starts.shape == (B, H, K) and part.slot.shape == (B, T, H)
    for b in range(B):
        for h in range(H):
            starts = blocks_by_hand(run.trace.boundary[b, :, h], run.trace.merged[b, :, h])
            assert part.starts[b, h].tolist() == starts + [-1] * (K - len(starts))
            want = [max(i for i, s in enumerate(starts) if s <= t) for t in range(T)]
            assert part.slot[b, :, h].tolist() == want
    np.testing.assert_array_equal(part.starts, dla_ref.slot_starts(run.trace, K)[:, -1])


@settings(max_examples=20)
@given(cases(), st.integers(1, 13))
def test_partition_after_an_initial_cache_counts_from_the_streams_start(case, cut):
    x, opts = case
    T = x["q"].shape[1]
    if T < 2:
        return
    cut = min(cut, T - 1)
    part = lambda sl: {k: (a[:, sl] if isinstance(a, np.ndarray) else a)  # noqa: E731
                       for k, a in {**x, **opts}.items()}
    head = dla_ref.dla(**part(slice(0, cut)))
    tail = dla_ref.dla(**part(slice(cut, T)), initial_cache=head.cache)
    whole = dla_ref.partition(dla_ref.dla(**x, **opts))
    np.testing.assert_array_equal(dla_ref.partition(tail).starts, whole.starts)
    np.testing.assert_array_equal(dla_ref.partition(tail).slot, whole.slot[:, cut:])


def test_partition_refuses_what_is_not_a_result():
    with pytest.raises(TypeError, match="result must be a dla_ref.Result"):
        dla_ref.partition((1, 2, 3))


@pytest.mark.parametrize("dtypes, dtype, o_dtype, state_dtype", [
    (("float32",) * 4, None, "float32", "float64"),
    (("float32",) * 4, "float32", "float32", "float32"),
    (("float32", "float32", "float32", "float64"), None, "float64", "float64"),
    (("float64",) * 4, "float32", "float64", "float32"),
])
def test_o_has_the_inputs_dtype_and_the_state_the_computing_dtype(dtypes, dtype, o_dtype,
                                                                  state_dtype):
    x, gates = make_inputs(21, T=6, K=3, backbone="mamba2")
    x = {name: a.astype(d) for (name, a), d in zip(x.items(), dtypes)}
    run = dla_ref.dla(**x, **gates, capacity=3, dtype=None if dtype is None else np.dtype(dtype))
    assert run.o.dtype == o_dtype
    assert run.cache.S.dtype == run.cache.info.dtype == run.trace.scores.dtype == state_dtype
    assert run.cache.n.dtype == run.cache.m.dtype == run.trace.merged.dtype == np.int64
    assert dla_ref.materialized(**x, **gates, capacity=3, trace=run.trace).dtype == o_dtype
    levels = dict(x, lam=x["lam"][..., :1])
    assert dla_ref.loglinear(**levels, **gates).dtype == o_dtype


def test_a_result_names_the_backend_that_made_it():
    x, gates = make_inputs(22, T=4, K=2)
    run = dla_ref.dla(**x, **gates, capacity=2)
    assert run.backend == "reference" and run._fields[-1] == "backend"
    o, cache, trace, backend = run
    assert dla_ref.Result(o, cache, trace).backend == "reference"


def test_numpy_scalars_count_as_python_numbers():
    x, gates = make_inputs(23, T=10, K=3, backbone="mamba2")
    want = dla_ref.dla(**x, **gates, capacity=3, tau=0.6, eps=1e-6)
    got = dla_ref.dla(**x, **gates, capacity=np.int64(3), tau=np.float32(0.6),
                      eps=np.float64(1e-6))
    np.testing.assert_array_equal(got.o, want.o)
    fixed = dla_ref.fixed(**x, **gates, capacity=np.int32(3), chunk=np.int64(2))
    np.testing.assert_array_equal(fixed.o, dla_ref.fixed(**x, **gates, capacity=3, chunk=2).o)
    assert dla_ref.check_trace(**x, **gates, capacity=np.int8(3), tau=np.float32(0.6),
                               score_tol=np.float32(1e-6), trace=want.trace) is None


@pytest.mark.parametrize("B, H", [(0, 2), (2, 0), (0, 0)])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_no_streams_give_empty_results_of_the_right_shapes(B, H, backbone):
    T, Dk, Dv, K = 5, 3, 4, 3
    x, gates = make_inputs(24, B=B, T=T, H=H, Dk=Dk, Dv=Dv, K=K, backbone=backbone)
    run = dla_ref.dla(**x, **gates, capacity=K)
    assert run.o.shape == (B, T, H, Dv)
    assert [a.shape for a in run.cache] == [(B, H, K, Dk, Dv), (B, H, K), (B, H, K), (B, H)]
    assert [a.shape for a in run.trace] == [(B, T, H)] * 3
    assert dla_ref.fixed(**x, **gates, capacity=K, chunk=2).o.shape == (B, T, H, Dv)
    assert dla_ref.single(x["q"], x["k"], x["v"], **gates).o.shape == (B, T, H, Dv)
    assert dla_ref.materialized(**x, **gates, capacity=K, trace=run.trace).shape == (B, T, H, Dv)
    assert dla_ref.loglinear(**dict(x, lam=None), **gates).shape == (B, T, H, Dv)
    assert dla_ref.check_trace(**x, **gates, capacity=K, trace=run.trace) is None
    assert dla_ref.partition(run).slot.shape == (B, T, H)
