# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Testing a kernel against the spec
#
# DLA makes decisions — open a block, merge a pair — that are **discontinuous** in the
# inputs. A float32 kernel and the float64 reference can both be right and still decide
# differently where a score lies a hair from $\tau$, and after that one decision their
# outputs differ by O(1). So outputs alone cannot tell a correct kernel from a wrong one.
#
# The project's answer ([docs/spec/trace.md](../spec/trace.md)): every implementation
# returns the **trace** of its decisions, and a kernel is tested in two halves:
#
# 1. **decide** — replaying the kernel's trace, the reference recomputes every score and
#    density and checks that each decision was right up to a tolerance (*admissibility*);
# 2. **apply** — forced to follow the kernel's trace, the reference must produce the same
#    outputs and cache within the dtype's tolerance.
#
# This notebook walks through both on a small case, then tests a Triton kernel — run on
# the CPU by Triton's interpreter.

# %%
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels run on the CPU

import matplotlib.pyplot as plt
import numpy as np

import dla_backends
import dla_ref
from dla_backends.testing import assert_matches_reference, tolerance

# %% [markdown]
# ## A small case and its trace

# %%
rng = np.random.default_rng(5)
B, T, H, D, K = 1, 24, 2, 4, 4
case = dict(
    q=rng.standard_normal((B, T, H, D)),
    k=rng.standard_normal((B, T, H, D)) / np.sqrt(D),
    v=rng.standard_normal((B, T, H, D)),
    lam=rng.random((B, T, H, K)),
    log_alpha=-0.1 * rng.random((B, T, H)),
)
options = dict(backbone="mamba2", capacity=K, tau=1.2)
ref = dla_ref.dla(**case, **options)
tr = ref.trace

print(" t   I_t   boundary  merged   (head 0)")
for t in range(T):
    print(f"{t:2d}  {tr.scores[0, t, 0]:.3f}  {str(bool(tr.boundary[0, t, 0])):>8}"
          f"  {int(tr.merged[0, t, 0]):>6}")

# %% [markdown]
# From the boundaries and merges alone, `dla_ref.slot_starts` replays the partition
# history: the first token of every slot after every token (−1: unused).

# %%
starts = dla_ref.slot_starts(tr, K)[0, :, 0]
for t in (0, 5, 11, T - 1):
    print(f"after token {t:2d}: slots start at {starts[t].tolist()}")

# %% [markdown]
# ## Why outputs alone are not enough
#
# Put $\tau$ exactly on one token's score. The rule is $I_t \ge \tau$, so that token opens a
# block; one floating-point step higher and it does not. Both runs are correct DLA for
# their $\tau$ — a float32 kernel can land on either side of such a tie — yet the outputs
# split from that token on. (Here they stay apart; a later merge can also happen to bring
# the two partitions back together.)

# %%
t0 = int(np.flatnonzero(~tr.boundary[0, 1:, 0])[0]) + 1  # an absorbed token
tie = float(tr.scores[0, t0, 0])
at = dla_ref.dla(**case, **dict(options, tau=tie))
above = dla_ref.dla(**case, **dict(options, tau=float(np.nextafter(tie, np.inf))))
print(f"token {t0}: I = {tie!r}; boundary at tau = I: {bool(at.trace.boundary[0, t0, 0])}, "
      f"at the next float up: {bool(above.trace.boundary[0, t0, 0])}")

gap = np.abs(at.o - above.o)[0, :, 0].max(axis=-1)
fig, ax = plt.subplots(figsize=(9, 3))
ax.semilogy(np.arange(T), gap + 1e-17, "o-")
ax.axvline(t0, color="tab:red", ls="--", label=f"the tie at token {t0}")
ax.set(xlabel="token t", ylabel="max |o_t difference|",
       title="tau one float apart: identical up to the tie, then different")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Decide: admissibility
#
# `dla_ref.check_trace` replays a trace and returns the first decision that is wrong by
# more than the tolerance, or `None`. Both traces above are admissible under *either*
# $\tau$: each decision is right up to `score_tol`.

# %%
for name, run in (("tau = I", at), ("tau = next float", above)):
    verdict = dla_ref.check_trace(**case, **dict(options, tau=tie), trace=run.trace)
    print(f"trace of the run with {name}: {verdict}")

# %% [markdown]
# A wrong decision is caught with its location and margin. Here we take a token that
# opened a block with a score well above $\tau$ while the cache was full, and force it to
# be absorbed instead (no boundary, hence no merge). The cache stays full, so every later
# decision of the trace still fits it.

# %%
t_bad = next(t for t in range(T) if tr.merged[0, t, 0] >= 0 and tr.scores[0, t, 0] > 1.3)
wrong = dla_ref.Trace(tr.scores, tr.boundary.copy(), tr.merged.copy())
wrong.boundary[0, t_bad, 0], wrong.merged[0, t_bad, 0] = False, -1
print(f"token {t_bad}: I = {tr.scores[0, t_bad, 0]:.3f} >= tau = {options['tau']}, "
      "forced to absorb")
print(dla_ref.check_trace(**case, **options, trace=wrong))

# %% [markdown]
# ## Apply: a forced trace
#
# `dla_ref.dla(..., trace=...)` makes no decision of its own: it follows the given trace
# (recomputing the scores) — this is how a kernel's outputs are compared with the
# reference's *under the kernel's decisions*. A trace that does not fit the cache is an
# error, never silently repaired:

# %%
forced = dla_ref.dla(**case, **options, trace=wrong)
print("forced run follows the trace:",
      bool(np.all(forced.trace.boundary == wrong.boundary)))
impossible = dla_ref.Trace(tr.scores, tr.boundary.copy(), tr.merged.copy())
impossible.boundary[0, 0, 0] = False  # the first token must open a slot
try:
    dla_ref.dla(**case, **options, trace=impossible)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## A Triton kernel, on the CPU
#
# `dla_backends.dla(..., backend="triton")` runs the project's Triton kernels; with
# `TRITON_INTERPRET=1` (set at the top) Triton interprets them on CPU tensors. Here is the
# test by hand — the two halves with the float32 tolerances of `dla_backends.testing` —
# and then in one call.

# %%
import torch  # noqa: E402  (here, where the notebook first needs it: torch is optional)

native = {name: torch.tensor(x, dtype=torch.float32) for name, x in case.items()}
backend = "triton"
try:
    dla_backends.select(native["q"], backend=backend).load()
except (RuntimeError, ImportError) as err:
    print(f"The Triton backend cannot run here ({type(err).__name__}: {err}).")
    backend = "torch"
    print(f"Demonstrating with backend={backend!r} instead.")


def kernel(q, k, v, lam, **arguments):
    """The implementation under test, with the signature of dla_ref.dla."""
    return dla_backends.dla(q, k, v, lam, backend=backend, **arguments)


got = kernel(**native, **options)
print(f"ran backend {backend!r}: outputs {tuple(got.o.shape)} {got.o.dtype}")

# %%
tol = tolerance("float32", "float32")
kernel_trace = dla_ref.Trace(*(x.numpy() for x in got.trace))
print("decide:", dla_ref.check_trace(**case, **options, trace=kernel_trace,
                                     score_tol=tol.decision, density_tol=tol.decision)
      or "every decision admissible")
want = dla_ref.dla(**case, **options, trace=kernel_trace)  # float64, the kernel's trace
err = np.abs(got.o.numpy() - want.o).max()
budget = tol.atol + tol.rtol * np.abs(want.o).max()
print(f"apply: max |o - o_ref| = {err:.2e}, within the float32 tolerance: {err <= budget} "
      f"(atol + rtol * max|o_ref| = {budget:.1e})")
print("traces equal to the reference's own:",
      all(np.array_equal(a, b) for a, b in zip(kernel_trace[1:], tr[1:])))

# %% [markdown]
# `assert_matches_reference` runs both halves (and the exact rules of
# [docs/spec/boundaries.md](../spec/boundaries.md), and
# trace equality where every decision is clear) for any callable with the signature of
# `dla_ref.dla`, and prints a paste-ready reproducer on failure. It returns the largest
# share of a tolerance budget used:

# %%
share = assert_matches_reference(kernel, **native, **options)
print(f"{backend}: passed, using {share:.1%} of the float32 budget")

# %% [markdown]
# To test your own kernel the same way, see [testing-your-kernel.md](../testing-your-kernel.md);
# the trace and admissibility are specified in [spec/trace.md](../spec/trace.md).
