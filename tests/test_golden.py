"""Golden vectors (backends/testing/golden/): intact, complete, and what the reference computes.

A failure of ``test_reference_has_not_drifted`` means dla_ref changed its results (the
forward pass or ``dla_ref.vjp``'s gradients): if the change is deliberate, regenerate with
``dla golden --write`` and say so in the commit, since C++/CUDA tests elsewhere compare
against these files. The stored gradients are also checked without ``vjp``: as
directional derivatives of the forward pass (central differences).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest

import dla_ref
from dla_backends.testing import golden
from dla_backends.testing import decision_margins

DOC = golden.DIRECTORY.parents[2] / "docs" / "golden-vectors.md"


@pytest.mark.parametrize("name", golden.GOLDEN_CASES)
def test_checksums(name):
    """Every array's bytes, at the manifest's offset and through np.load, match its SHA-256."""
    assert golden.checksum_problems(name) == []


@pytest.mark.parametrize("name", golden.GOLDEN_CASES)
def test_reference_has_not_drifted(name):
    """The case's spec regenerates its inputs and adjoints, dla_ref.dla its outputs, and
    dla_ref.vjp its gradients."""
    assert golden.drift(name) == []


@pytest.mark.parametrize("name", golden.GOLDEN_CASES)
def test_every_case_stores_its_gradient(name):
    """do and dcache among the inputs; d<x> of its input's shape for every differentiable
    input x the case has, and nothing else, among the outputs."""
    entry = golden.read_manifest()["cases"][name]
    dims = entry["dims"]
    assert entry["inputs"]["do"]["shape"] == [dims[d] for d in ("B", "T", "H", "Dv")]
    assert entry["inputs"]["dcache"]["shape"] == entry["outputs"]["S"]["shape"]
    gradients = {array: meta["shape"] for array, meta in entry["outputs"].items()
                 if array in golden.GRADIENTS}
    assert gradients == {f"d{x}": entry["inputs"][x]["shape"]
                         for x in differentiable(golden.read_case(name)[0])}


def differentiable(case) -> dict:
    """The case's inputs that have a gradient (by their names in the files)."""
    arrays = {x: getattr(case, x) for x in ("q", "k", "v", "lam", "log_alpha", "beta")}
    if case.initial_cache is not None:
        arrays["initial_S"] = case.initial_cache.S
    return {x: a for x, a in arrays.items() if a is not None}


@pytest.mark.parametrize("name", golden.GOLDEN_CASES)
def test_the_stored_gradients_are_derivatives_of_the_forward_pass(name):
    """Along a random direction u, sum over inputs of <d<x>, u_x> equals the central
    difference of L = <do, o> + <dcache, S> computed by dla_ref.dla under the stored trace:
    a check of the stored gradients that does not run dla_ref.vjp. u is zero where a step
    would leave the inputs' domain (lam >= 0, log_alpha <= 0, beta in [0, 1]) and in the
    unused slots of an initial cache."""
    case, stored = golden.read_case(name)
    trace = dla_ref.Trace(*(stored[f] for f in dla_ref.Trace._fields))
    rng = np.random.default_rng(0)
    u = {x: rng.standard_normal(a.shape) * inside(case, x, a)
         for x, a in differentiable(case).items()}

    def loss(h):
        moved = {x: a + h * u[x] for x, a in differentiable(case).items()}
        cache = case.initial_cache
        if cache is not None:
            cache = cache._replace(S=moved.pop("initial_S"))
        args = dataclasses.replace(case, **moved, initial_cache=cache).arguments()
        result = dla_ref.dla(**{**args, "trace": trace})
        return np.sum(stored["do"] * result.o) + np.sum(stored["dcache"] * result.cache.S)

    h = 1e-6
    difference = (loss(h) - loss(-h)) / (2 * h)
    predicted = sum(np.sum(stored[f"d{x}"] * u[x]) for x in u)
    scale = sum(np.sum(np.abs(stored[f"d{x}"] * u[x])) for x in u)
    assert abs(difference - predicted) <= 1e-6 * scale, (difference, predicted)


def inside(case, x, a) -> np.ndarray:
    """1 where input x may move by a small step both ways, else 0."""
    margin = 1e-3
    if x == "lam":
        return a > margin
    if x == "log_alpha":
        return a < -margin
    if x == "beta":
        return (a > margin) & (a < 1 - margin)
    if x == "initial_S":
        used = np.arange(a.shape[2]) < case.initial_cache.m[..., None]  # [B, H, K]
        return used[..., None, None]
    return np.ones(a.shape, dtype=bool)


def test_manifest_lists_exactly_the_cases_and_files():
    manifest = golden.read_manifest()
    assert manifest["format"] == golden.FORMAT
    assert list(manifest["cases"]) == list(golden.GOLDEN_CASES)
    files = {entry["file"] for entry in manifest["cases"].values()} | {"manifest.json"}
    assert {p.name for p in golden.DIRECTORY.iterdir()} == files


def test_the_cases_cover_what_a_kernel_must_get_right():
    """Every backbone, both score modes and slot orders, normalize off, K = 1, a merge,
    a forced trace, an initial cache, and a score exactly at tau."""
    cases = {name: golden.read_case(name) for name in golden.GOLDEN_CASES}
    options = [case.options for case, _ in cases.values()]
    for field, values in (("backbone", dla_ref.BACKBONES), ("score", dla_ref.SCORES),
                          ("slots", dla_ref.SLOT_ORDERS), ("normalize", (True, False))):
        assert {o[field] for o in options} == set(values), field
    assert any(o["capacity"] == 1 for o in options)
    assert any((stored["merged"] >= 0).any() for case, stored in cases.values()
               if case.trace is None)
    assert any(case.trace is not None and (case.trace.merged >= 0).any()
               for case, _ in cases.values())
    assert any(case.initial_cache is not None and (case.initial_cache.m > 0).all()
               for case, _ in cases.values())
    assert any(o["tau"] == 0 and (stored["scores"][:, 1:] == 0).any()
               for o, (_, stored) in zip(options, cases.values()))


def test_write_then_check_round_trip(tmp_path):
    """``--write`` output passes both checks, and writing again changes no byte."""
    golden.write(tmp_path)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name in golden.GOLDEN_CASES:
        assert golden.checksum_problems(name, tmp_path) == []
        assert golden.drift(name, tmp_path) == []
    golden.write(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    shutil.copytree(golden.DIRECTORY, tmp_path, dirs_exist_ok=True)
    name = "linear-token-merges"
    entry = golden.read_manifest(tmp_path)["cases"][name]
    path = tmp_path / entry["file"]
    blob = bytearray(path.read_bytes())
    blob[entry["outputs"]["o"]["offset"] + 5] ^= 1
    path.write_bytes(bytes(blob))
    problems = golden.checksum_problems(name, tmp_path)
    assert problems and all(p.startswith(f"{name}.o:") for p in problems)


def test_a_changed_output_fails_the_drift_check(tmp_path):
    shutil.copytree(golden.DIRECTORY, tmp_path, dirs_exist_ok=True)
    name = "gdn-state-merges"
    path = tmp_path / golden.read_manifest(tmp_path)["cases"][name]["file"]
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["S"][0, 0, 0, 0, 0] += 1e-9 * np.max(np.abs(arrays["S"]))  # 10x the allowed drift
    golden.save_npz(path, arrays)
    problems = golden.drift(name, tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{name} (outputs).S: differs")


def test_a_changed_gradient_fails_the_drift_check(tmp_path):
    shutil.copytree(golden.DIRECTORY, tmp_path, dirs_exist_ok=True)
    name = "gdn-initial-cache"
    path = tmp_path / golden.read_manifest(tmp_path)["cases"][name]["file"]
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["dbeta"][0, 0, 0] += 1e-9 * np.max(np.abs(arrays["dbeta"]))  # 10x the allowed drift
    golden.save_npz(path, arrays)
    problems = golden.drift(name, tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{name} (gradients).dbeta: differs")


def test_manifest_is_plain_json():
    """No NaN or Infinity (not JSON), so any JSON reader takes it."""
    json.loads((golden.DIRECTORY / "manifest.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


@pytest.mark.parametrize("name", [name for name, spec in golden.GOLDEN_CASES.items()
                                  if "ties" not in name and not spec.forced_trace])
def test_every_decision_is_clear_of_a_tie(name):
    """At least 0.02 between each free score and tau, and between the two least dense
    pairs at each merge: a float32 kernel must reproduce the stored trace exactly."""
    case, _ = golden.read_case(name)
    margins = decision_margins(case)[1]
    assert margins.score.min() > 0.02 and margins.density.min() > 0.02


def test_the_c_reader_of_the_docs_reads_an_array(tmp_path):
    """docs/golden-vectors.md's C program prints exactly the stored float64 output."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    source = DOC.read_text().split("```c\n")[1].split("```")[0]
    (tmp_path / "read_golden.c").write_text(source)
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-o", str(tmp_path / "read_golden"),
                    str(tmp_path / "read_golden.c")], check=True)
    name = "gdn-state-merges"
    entry = golden.read_manifest()["cases"][name]["outputs"]["o"]
    printed = subprocess.run([str(tmp_path / "read_golden"),
                              str(golden.DIRECTORY / f"{name}.npz"), str(entry["offset"]),
                              str(entry["nbytes"])], capture_output=True, text=True,
                             check=True).stdout.split()
    stored = golden.read_case(name)[1]["o"].ravel()
    assert np.array_equal(np.array(printed, dtype=np.float64), stored)
