"""dla_backends.nn: the layer computes DLA (checked against dla_ref), decodes what it
prefills, the straight-through gate has the documented gradient, the tasks are what
they claim.

Expected values come from dla_ref (the recurrent reference, its own readout mask and
trace scores), never from the layer under test.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="dla_backends.nn needs torch")

import dla_ref  # noqa: E402
from dla_backends.nn import DLAAttention, LayerCache  # noqa: E402
from dla_backends.nn import functional as F  # noqa: E402
from dla_backends.nn import tasks  # noqa: E402
from dla_ref.parallel import partition_history, readout_mask  # noqa: E402

B, T, D, H = 2, 24, 16, 2


def make_layer(policy="dla", gate="hard", backbone="mamba2", capacity=6, tau=0.9, seed=0,
               **options):
    torch.manual_seed(seed)
    layer = DLAAttention(D, H, backbone=backbone, capacity=capacity, tau=tau, policy=policy,
                         gate=gate, **options).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    return layer, x


def reference_o(layer, x, trace=None):
    """o [B, T, H, Dv] of the layer's projections by dla_ref (float64)."""
    q, k, v, lam, log_alpha, beta = (None if a is None else a.detach().numpy()
                                     for a in layer.project(x))
    common = dict(backbone=layer.backbone, log_alpha=log_alpha, beta=beta)
    K = layer.capacity
    if layer.policy == "loglinear":
        return dla_ref.loglinear(q, k, v, lam, **common)
    if layer.policy == "single":
        return dla_ref.dla(q, k, v, lam[..., :1], capacity=1, **common).o
    if layer.policy == "fixed":
        chunk = layer.chunk or -(-T // K)
        return dla_ref.fixed(q, k, v, lam, chunk=chunk, capacity=K, **common).o
    return dla_ref.dla(q, k, v, lam, capacity=K, tau=float(layer.tau[0]), trace=trace,
                       **common).o


def layer_trace(layer):
    boundary, merged = layer.last_trace
    return dla_ref.Trace(np.zeros(boundary.shape), boundary, merged)


@pytest.mark.parametrize("policy", ["dla", "fixed", "loglinear", "single"])
@pytest.mark.parametrize("backbone", ["mamba2", "linear"])
def test_masked_core_computes_the_reference(policy, backbone):
    layer, x = make_layer(policy, backbone=backbone)
    q, k, v, lam, log_alpha, beta = layer.project(x)
    o = layer.mix(q, k, v, lam, log_alpha, beta)
    trace = layer_trace(layer) if policy == "dla" else None
    np.testing.assert_allclose(o.detach().numpy(), reference_o(layer, x, trace), atol=1e-10)


def test_dla_trace_is_admissible_and_has_merges():
    layer, x = make_layer("dla", capacity=3, tau=0.5)
    q, k, v, lam, log_alpha, _ = (a.detach().numpy() if a is not None else None
                                  for a in layer.project(x))
    layer.mix(*layer.project(x))
    trace = layer_trace(layer)
    assert (trace.merged >= 0).any(), "the case should exercise merges"
    bad = dla_ref.check_trace(q, k, v, lam, trace, backbone="mamba2", log_alpha=log_alpha,
                              tau=0.5, capacity=3, score_tol=1e-4, density_tol=1e-4)
    assert bad is None, bad


def test_scan_core_agrees_with_masked_core():
    masked, x = make_layer("dla", core="masked")
    scan, _ = make_layer("dla", core="scan")
    y_masked, _ = masked(x)
    y_scan, _ = scan(x)
    np.testing.assert_allclose(y_scan.detach().numpy(), y_masked.detach().numpy(), atol=1e-9)


@pytest.mark.parametrize("policy", ["dla", "fixed", "loglinear", "single"])
def test_prefill_then_decode_equals_one_pass(policy):
    layer, x = make_layer(policy, chunk=5)
    with torch.no_grad():
        whole, _ = layer(x)
        first, cache = layer(x[:, :10], use_cache=True)
        pieces = [first]
        for t in range(10, T):
            y, cache = layer(x[:, t:t + 1], cache=cache)
            pieces.append(y)
    assert isinstance(cache, LayerCache) and cache.seen == T
    np.testing.assert_allclose(torch.cat(pieces, 1).numpy(), whole.numpy(), atol=1e-9)


def test_gdn_runs_on_the_scan_with_unit_keys():
    layer, x = make_layer("dla", backbone="gdn")
    assert layer.core == "scan"
    _, k, *_ = layer.project(x)
    np.testing.assert_allclose(k.norm(dim=-1).detach().numpy(), 1.0, atol=1e-12)
    y, _ = layer(x)
    y.sum().backward()
    assert layer.beta_proj.weight.grad.abs().sum() > 0


def test_every_parameter_gets_a_gradient_and_tau_only_with_ste():
    for gate in ("hard", "ste"):
        layer, x = make_layer("dla", gate=gate)
        layer(x)[0].square().sum().backward()
        for name, p in layer.named_parameters():
            if name == "tau":
                assert (p.grad is not None) == (gate == "ste")
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- the straight-through gate ----------------------------------------------------------------


def test_ste_forward_is_bit_identical_to_hard():
    hard, x = make_layer("dla", gate="hard")
    ste, _ = make_layer("dla", gate="ste")
    assert torch.equal(hard(x)[0], ste(x)[0])


def test_differentiable_score_equals_the_reference_scores():
    layer, x = make_layer("dla", capacity=3, tau=0.5)
    q, k, v, lam, log_alpha, _ = layer.project(x)
    layer.mix(q, k, v, lam, log_alpha, None)
    trace = layer_trace(layer)
    ref = dla_ref.dla(*(a.detach().numpy() for a in (q, k, v, lam)), backbone="mamba2",
                      log_alpha=log_alpha.detach().numpy(), capacity=3, trace=trace)
    boundary = torch.as_tensor(trace.boundary.transpose(0, 2, 1).copy())
    starts = F.open_starts(trace.boundary.transpose(0, 2, 1).reshape(B * H, T),
                           trace.merged.transpose(0, 2, 1).reshape(B * H, T), 3)
    scalars = F.score_scalars(k, v, log_alpha, boundary, torch.as_tensor(starts).view(B, H, T))
    score = F.information_score(*scalars, layer.dk * layer.dv, layer.eps)
    expected = np.asarray(ref.trace.scores).transpose(0, 2, 1)
    np.testing.assert_allclose(score.detach().numpy()[:, :, 1:], expected[:, :, 1:], atol=1e-6)


def relaxed_output(layer, inputs, trace, soft_at):
    """The layer's output under the relaxed write, b~ evaluated at ``inputs``."""
    q, k, v, lam, log_alpha = inputs
    B_, T_, H_, _ = q.shape
    to_streams = lambda a: a.transpose(0, 2, 1).reshape(B_ * H_, T_)  # noqa: E731
    slot = torch.as_tensor(F.slot_map_from_trace(to_streams(trace[0]), to_streams(trace[1]),
                                                 layer.capacity)).view(B_, H_, T_, T_)
    weights = layer.straight_through(F.readout_mask(lam, slot), k, v, log_alpha, trace,
                                     soft_at=soft_at)
    return F.masked_attention(q, k, v, weights, F.decay_matrix(log_alpha, T_, q.device))


def test_ste_gradient_is_the_gradient_of_the_relaxed_objective():
    """Autograd of the straight-through layer = central differences of
    F(theta) = <w, o(theta; Lambda + (b~(theta) - b~(theta_0)) D)> under the fixed trace."""
    layer, x = make_layer("dla", gate="ste", capacity=3, tau=0.5, temperature=0.3)
    inputs = [a.detach().clone().requires_grad_(True)
              for a in layer.project(x) if a is not None]
    layer.mix(*inputs[:4], inputs[4], None)
    trace = layer.last_trace
    soft_at = layer.soft_gate(inputs[1], inputs[2], inputs[4], trace)[0].detach()
    w = torch.randn(B, T, H, layer.dv, dtype=torch.float64)
    objective = lambda xs: (w * relaxed_output(layer, xs, trace, soft_at)).sum()  # noqa: E731
    ste = (w * relaxed_output(layer, inputs, trace, None)).sum()
    grads = torch.autograd.grad(ste, inputs + [layer.tau])
    rng = np.random.default_rng(1)
    for i, g in enumerate(grads):
        direction = torch.as_tensor(rng.standard_normal(g.shape))
        h = 1e-6
        with torch.no_grad():
            if i < len(inputs):
                plus = objective([a + h * direction if j == i else a for j, a in enumerate(inputs)])
                minus = objective([a - h * direction if j == i else a
                                   for j, a in enumerate(inputs)])
            else:
                layer.tau += h * direction
                plus = objective(inputs)
                layer.tau -= 2 * h * direction
                minus = objective(inputs)
                layer.tau += h * direction
        numeric = float((plus - minus) / (2 * h))
        analytic = float((g * direction).sum())
        assert abs(numeric - analytic) <= 1e-5 * (1 + abs(numeric)), (i, numeric, analytic)
    assert grads[-1].abs().sum() > 0, "tau should receive a gradient"


def test_tau_gradient_follows_the_documented_formula():
    """d loss / d tau_h = -sum_{b, s >= 1} g_s b~_s (1 - b~_s) / temp, with
    g_s = sum_{t >= s} D[t, s] (q_t . k_s) exp(c_t - c_s) (dO_t . v_s), built here from
    dla_ref's readout mask and trace scores (docs/training.md)."""
    temp = 0.3
    layer, x = make_layer("dla", gate="ste", capacity=3, tau=0.5, temperature=temp)
    q, k, v, lam, log_alpha, _ = layer.project(x)
    layer.mix(q, k, v, lam, log_alpha, None)
    trace = layer_trace(layer)
    w = torch.randn(B, T, H, layer.dv, dtype=torch.float64)
    (w * layer.mix(q, k, v, lam, log_alpha, None)).sum().backward()

    q, k, v, lam, log_alpha = (a.detach().numpy() for a in (q, k, v, lam, log_alpha))
    scores = dla_ref.dla(q, k, v, lam, backbone="mamba2", log_alpha=log_alpha, capacity=3,
                         trace=trace).trace.scores
    streams = lambda a: np.moveaxis(a, 2, 1).reshape((B * H, T) + a.shape[3:])  # noqa: E731
    counts, m = partition_history(np, streams(trace.boundary), streams(trace.merged), 3)
    Lam = readout_mask(np, counts, m, streams(lam), "oldest-first")  # [N, T, T]
    previous = np.concatenate([np.zeros_like(Lam[:, :, :1]), Lam[:, :, :-1]], axis=2)
    D_ = np.where(streams(trace.boundary)[:, None, :], Lam - previous, -Lam)
    c = np.cumsum(streams(log_alpha), axis=1)
    causal = np.tril(np.ones((T, T), dtype=bool))
    decay = np.where(causal, np.exp(np.where(causal, c[:, :, None] - c[:, None, :], 0)), 0)
    A = np.einsum("ntd,nsd->nts", streams(q), streams(k)) * decay
    dO_v = np.einsum("ntd,nsd->nts", streams(w.numpy()), streams(v))
    g = (D_ * A * dO_v).sum(axis=1)  # [N, T(s)]
    soft = 1 / (1 + np.exp(-(streams(scores) - 0.5) / temp))
    per_token = -g * soft * (1 - soft) / temp
    expected = per_token[:, 1:].reshape(B, H, T - 1).sum(axis=(0, 2))
    np.testing.assert_allclose(layer.tau.grad.numpy(), expected, rtol=1e-5, atol=1e-9)


# --- bad options ----------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(d_model=15), "divisible"),
    (dict(policy="random"), "policy"),
    (dict(gate="soft"), "gate"),
    (dict(backbone="rnn"), "backbone"),
    (dict(capacity=0), "capacity"),
    (dict(gate="ste", policy="fixed"), "ste"),
    (dict(gate="ste", backbone="gdn"), "ste"),
    (dict(core="masked", backbone="gdn"), "masked"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_options_raise_value_error_naming_them(options, message):
    kwargs = dict(d_model=16, n_heads=2) | options
    with pytest.raises(ValueError, match=message):
        DLAAttention(kwargs.pop("d_model"), kwargs.pop("n_heads"), **kwargs)


def test_loglinear_needs_a_column_per_level():
    layer, x = make_layer("loglinear", capacity=4)  # T = 24 has 6 levels
    with pytest.raises(ValueError, match="capacity >= 6"):
        layer(x)


# --- tasks ----------------------------------------------------------------------------------


def test_mqar_queries_ask_for_the_value_paired_earlier():
    batch = tasks.mqar(np.random.default_rng(0), 4, 64, 8)
    for inputs, targets in zip(batch.inputs, batch.targets):
        pairs = dict(zip(inputs[0:16:2], inputs[1:16:2]))
        assert len(pairs) == 8
        at = np.flatnonzero(targets != tasks.IGNORE)
        assert len(at) == 8 and at.min() >= 16
        for t in at:
            assert targets[t] == pairs[inputs[t]] == inputs[t + 1]


def test_niah_target_is_the_needle_value():
    batch = tasks.niah(np.random.default_rng(0), 8, 40)
    for inputs, targets in zip(batch.inputs, batch.targets):
        depth = int(np.flatnonzero(inputs == tasks.NEEDLE)[0])
        assert inputs[-2] == tasks.QUERY and inputs[-1] == inputs[depth + 1]
        assert targets[-1] == inputs[depth + 2]
        assert (targets[:-1] == tasks.IGNORE).all()


def test_tasks_are_seeded():
    one = tasks.make_batch("mqar", np.random.default_rng(3), 2, 32, 4)
    two = tasks.make_batch("mqar", np.random.default_rng(3), 2, 32, 4)
    assert (one.inputs == two.inputs).all() and (one.targets == two.targets).all()


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="task"):
        tasks.make_batch("copy", np.random.default_rng(0), 1, 32, 4)
    with pytest.raises(ValueError, match="pairs"):
        tasks.mqar(np.random.default_rng(0), 1, 16, 8)


def test_each_head_decides_with_its_own_tau():
    layer, x = make_layer("dla", gate="ste", capacity=3)
    with torch.no_grad():
        layer.tau.copy_(torch.tensor([0.2, 1.5]))
    q, k, v, lam, log_alpha, _ = layer.project(x)
    layer.mix(q, k, v, lam, log_alpha, None)
    boundary, _ = layer.last_trace
    for h, tau in enumerate((0.2, 1.5)):
        head = [a.detach().numpy()[:, :, h:h + 1] for a in (q, k, v, lam, log_alpha)]
        ref = dla_ref.dla(*head[:4], backbone="mamba2", log_alpha=head[4], tau=tau, capacity=3)
        assert (boundary[:, :, h:h + 1] == ref.trace.boundary).all()
    assert boundary[:, :, 0].sum() > boundary[:, :, 1].sum()
    with torch.no_grad():  # decoding keeps the per-head thresholds
        whole, _ = layer(x)
        first, cache = layer(x[:, :7], use_cache=True)
        rest, _ = layer(x[:, 7:], cache=cache)
    np.testing.assert_allclose(torch.cat([first, rest], 1).numpy(), whole.numpy(), atol=1e-9)
