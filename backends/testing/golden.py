"""Golden vectors: small fixed cases computed by the reference, readable without Python.

    dla golden            check the stored files against the reference
    dla golden --write    regenerate them (after a deliberate change)

(``python -m dla_backends.testing.golden`` is the same command.)

Each case is one uncompressed .npz file (a zip of .npy arrays: little-endian, C order)
in backends/testing/golden/, and manifest.json describes them all: options, dimensions, and
per array its dtype, shape, SHA-256 of the raw bytes and the byte offset of those bytes
inside the .npz, so that a C++/CUDA test can read an array with one seek and one read.
Besides the forward pass, each case holds its gradient: seeded adjoints of the outputs
(do, dcache) among the inputs, and ``dla_ref.vjp``'s gradients under the case's own trace
among the outputs (docs/spec/gradient.md). docs/golden-vectors.md documents the layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

import dla_ref

from .cases import Case, CaseSpec, build_case

DIRECTORY = Path(__file__).parent / "golden"
FORMAT = "dla-golden/1"
SHAPE = dict(B=2, H=2, Dk=4, Dv=3)  # Dk != Dv, so that a transposed state shows

# Every decision is at least 0.02 from a tie (a score from tau, the least dense pair
# from the next), so that a float32 kernel must reproduce each trace exactly; only
# linear-ties-at-tau-0 has exact ties, which the rules decide (>= at tau, oldest pair).
GOLDEN_CASES = {
    "linear-token-merges": CaseSpec(T=16, capacity=3, tau=1.0, tokens="segments", seed=101,
                                    **SHAPE),
    "linear-state-newest-first": CaseSpec(T=16, capacity=4, tau=0.3, score="state",
                                          slots="newest-first", tokens="segments", seed=161,
                                          **SHAPE),
    "mamba2-token-unnormalized": CaseSpec(T=16, capacity=3, tau=1.0, backbone="mamba2",
                                          normalize=False, decay="mixed", tokens="segments",
                                          seed=102, **SHAPE),
    "gdn-state-merges": CaseSpec(T=16, capacity=3, tau=0.3, backbone="gdn", score="state",
                                 tokens="segments", seed=119, **SHAPE),
    "mamba2-forced-trace": CaseSpec(T=12, capacity=3, backbone="mamba2", forced_trace=True,
                                    seed=105, **SHAPE),
    # seed 104 until the clamp at 2 and the absorbed zero contributions (issue 13) brought
    # a merge within 0.006 of a tie there
    "gdn-initial-cache": CaseSpec(T=8, capacity=3, tau=1.0, backbone="gdn", split=8,
                                  slots="newest-first", tokens="segments", seed=255, **SHAPE),
    "linear-ties-at-tau-0": CaseSpec(T=10, capacity=3, tau=0.0, tokens="repeated",
                                     seed=107, **SHAPE),
    "mamba2-single-state": CaseSpec(T=8, capacity=1, backbone="mamba2", seed=108, **SHAPE),
}

# Array names in the files: the inputs of dla_ref.dla, then what it returns; the adjoints
# of its outputs (inputs of dla_ref.vjp), then the gradients vjp returns.
INPUTS = ("q", "k", "v", "lam", "log_alpha", "beta", "forced_boundary", "forced_merged",
          "initial_S", "initial_n", "initial_info", "initial_m")
OUTPUTS = ("o", "S", "n", "info", "m", "scores", "boundary", "merged")
ADJOINTS = ("do", "dcache")
GRADIENTS = dla_ref.Gradients._fields  # dq, dk, dv, dlam, dlog_alpha, dbeta, dinitial_S
LITTLE_ENDIAN = {"float64": "<f8", "int64": "<i8", "bool": "|b1"}


def case_arrays(case: Case) -> dict[str, np.ndarray]:
    """The case's inputs under the names of INPUTS (absent ones left out)."""
    arrays = {name: getattr(case, name) for name in ("q", "k", "v", "lam", "log_alpha", "beta")}
    if case.trace is not None:
        arrays.update(forced_boundary=case.trace.boundary, forced_merged=case.trace.merged)
    if case.initial_cache is not None:
        arrays.update({f"initial_{f}": x for f, x in case.initial_cache._asdict().items()})
    return {name: x for name, x in arrays.items() if x is not None}


def result_arrays(result: dla_ref.Result) -> dict[str, np.ndarray]:
    """A Result under the names of OUTPUTS."""
    return dict(o=result.o, **result.cache._asdict(), **result.trace._asdict())


def adjoints(case: Case, seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal adjoints of the outputs: do [B, T, H, Dv] of o, and dcache
    [B, H, K, Dk, Dv] of the final cache's S, from a stream of the case's seed apart from
    its inputs' (``np.random.default_rng([seed, 1])``)."""
    rng = np.random.default_rng([seed, 1])
    B, T, H, Dk = case.q.shape
    K, Dv = case.options["capacity"], case.v.shape[3]
    return dict(do=rng.standard_normal((B, T, H, Dv)),
                dcache=rng.standard_normal((B, H, K, Dk, Dv)))


def gradient_arrays(case: Case, trace: dla_ref.Trace, adjoint: dict) -> dict[str, np.ndarray]:
    """``dla_ref.vjp`` of the case under ``trace`` for the adjoints, under the names of
    GRADIENTS; absent ones left out (dlog_alpha for linear, dbeta unless gdn, dinitial_S
    without an initial cache)."""
    grads = dla_ref.vjp(**{**case.arguments(), "trace": trace}, **adjoint)._asdict()
    if case.initial_cache is None:
        grads["dinitial_S"] = None
    return {name: x for name, x in grads.items() if x is not None}


def canonical(x) -> np.ndarray:
    """x as a C-ordered little-endian array of float64, int64 or bool."""
    x = np.asarray(x)
    kind = "float64" if x.dtype.kind == "f" else "int64" if x.dtype.kind in "iu" else "bool"
    return np.ascontiguousarray(x, dtype=np.dtype(LITTLE_ENDIAN[kind]))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed .npz whose bytes depend only on the arrays.

    Like ``np.savez``, but every member has the same fixed timestamp, so that
    regenerating unchanged cases leaves the files byte for byte as they were.
    """
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, x in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, x, allow_pickle=False)


def data_offsets(path: Path) -> dict[str, int]:
    """Byte offset, inside the .npz, of each array's raw data (members are stored)."""
    offsets = {}
    with open(path, "rb") as raw, zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: member {info.filename} is compressed")
            raw.seek(info.header_offset + 26)  # the local header's name and extra lengths
            name_len, extra_len = (int(x) for x in np.frombuffer(raw.read(4), dtype="<u2"))
            member_start = info.header_offset + 30 + name_len + extra_len
            offsets[info.filename.removesuffix(".npy")] = (member_start
                                                           + npy_header_size(archive, info))
    return offsets


def npy_header_size(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Bytes of the .npy header (magic, version, length, dict) before the array data."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        read_header(member)
        return member.tell()


def describe_array(x: np.ndarray, offset: int) -> dict:
    """The manifest entry of one stored array."""
    return dict(dtype=x.dtype.str, shape=list(x.shape), offset=offset, nbytes=x.nbytes,
                sha256=hashlib.sha256(x.tobytes()).hexdigest())


def write(directory: Path = DIRECTORY) -> dict:
    """Compute every golden case with the reference and write the files; returns the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = dict(format=FORMAT, generator="dla golden --write",
                    reference=f"dla_ref {dla_ref.__version__}", cases={})
    for name, spec in GOLDEN_CASES.items():
        case = build_case(spec)
        if not math.isfinite(case.options["tau"]):
            raise ValueError(f"golden case {name}: tau must be finite (JSON has no inf)")
        adjoint = adjoints(case, spec.seed)
        result = dla_ref.dla(**case.arguments())
        inputs = {k: canonical(x) for k, x in {**case_arrays(case), **adjoint}.items()}
        outputs = {k: canonical(x) for k, x in {
            **result_arrays(result), **gradient_arrays(case, result.trace, adjoint)}.items()}
        path = directory / f"{name}.npz"
        save_npz(path, {**inputs, **outputs})
        offsets = data_offsets(path)
        B, T, H, Dk = case.q.shape
        manifest["cases"][name] = dict(
            file=path.name, spec=repr(spec),
            options={**case.options, "eps": 1e-6},
            dims=dict(B=B, T=T, H=H, K=case.options["capacity"], Dk=Dk, Dv=case.v.shape[3]),
            inputs={k: describe_array(x, offsets[k]) for k, x in inputs.items()},
            outputs={k: describe_array(x, offsets[k]) for k, x in outputs.items()},
        )
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False)
                                             + "\n")
    return manifest


def read_manifest(directory: Path = DIRECTORY) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def read_case(name: str, directory: Path = DIRECTORY) -> tuple[Case, dict[str, np.ndarray]]:
    """A stored case as (Case, the rest of its arrays by name): the adjoints (ADJOINTS)
    and every output (OUTPUTS, then GRADIENTS)."""
    entry = read_manifest(directory)["cases"][name]
    with np.load(directory / entry["file"]) as data:
        arrays = {k: data[k] for k in data.files}
    trace = cache = None
    if "forced_boundary" in arrays:  # a forced trace's scores are not read: zeros
        boundary = arrays["forced_boundary"]
        trace = dla_ref.Trace(np.zeros(boundary.shape), boundary, arrays["forced_merged"])
    if "initial_S" in arrays:
        cache = dla_ref.Cache(*(arrays[f"initial_{f}"] for f in dla_ref.Cache._fields))
    case = Case(**{k: arrays.get(k) for k in ("q", "k", "v", "lam", "log_alpha", "beta")},
                options={k: v for k, v in entry["options"].items() if k != "eps"},
                trace=trace, initial_cache=cache)
    rest = [k for k in ADJOINTS if k in arrays] + list(entry["outputs"])
    return case, {k: arrays[k] for k in rest}


def checksum_problems(name: str, directory: Path = DIRECTORY) -> list[str]:
    """What does not match the manifest in a case's file (empty: all is well).

    For every array of the manifest: the raw bytes at its offset have its SHA-256, and
    the array NumPy reads from the .npz has its dtype, shape and those bytes.
    """
    entry = read_manifest(directory)["cases"][name]
    path = directory / entry["file"]
    problems = []
    blob = path.read_bytes()
    with np.load(path) as data:
        if set(data.files) != set(entry["inputs"]) | set(entry["outputs"]):
            problems.append(f"{name}: arrays {sorted(data.files)} differ from the manifest's")
        for array, meta in {**entry["inputs"], **entry["outputs"]}.items():
            raw = blob[meta["offset"]:meta["offset"] + meta["nbytes"]]
            if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
                problems.append(f"{name}.{array}: bytes at offset {meta['offset']} do not "
                                "have the manifest's SHA-256")
            try:
                x = data[array] if array in data.files else None
            except zipfile.BadZipFile as exc:  # the zip's own CRC caught it first
                problems.append(f"{name}.{array}: {exc}")
                continue
            if x is None or x.dtype.str != meta["dtype"] or list(x.shape) != meta["shape"] \
                    or not x.flags.c_contiguous or x.tobytes() != raw:
                problems.append(f"{name}.{array}: the .npy member does not match the manifest")
    return problems


def drift(name: str, directory: Path = DIRECTORY, rtol: float = 1e-10) -> list[str]:
    """How the reference today differs from a stored case (empty: it does not).

    Regenerates the inputs and adjoints from the case's spec (values exactly, an initial
    cache, itself computed by the reference, within rtol), reruns ``dla_ref.dla`` on the
    stored inputs, and ``dla_ref.vjp`` on them and the stored adjoints under the stored
    trace: floats must agree within rtol * max|stored| (BLAS may round differently
    across machines), integers and booleans exactly.
    """
    case, stored = read_case(name, directory)
    spec = GOLDEN_CASES[name]
    built = build_case(spec)
    fresh = {**case_arrays(built), **adjoints(built, spec.seed)}
    given = {**case_arrays(case), **pick(stored, ADJOINTS)}
    problems = compare(f"{name} (inputs from its spec)", fresh, given, rtol)
    outputs = result_arrays(dla_ref.dla(**case.arguments()))
    problems += compare(f"{name} (outputs)", outputs, pick(stored, OUTPUTS), rtol)
    trace = dla_ref.Trace(*(stored[f] for f in dla_ref.Trace._fields))
    grads = gradient_arrays(case, trace, pick(stored, ADJOINTS))
    return problems + compare(f"{name} (gradients)", grads, pick(stored, GRADIENTS), rtol)


def pick(arrays: dict, names: tuple[str, ...]) -> dict:
    """The entries of ``arrays`` under ``names`` (those present)."""
    return {name: arrays[name] for name in names if name in arrays}


def compare(label: str, got: dict, want: dict, rtol: float) -> list[str]:
    """Differences between two dicts of arrays (same names, values within rtol)."""
    if set(got) != set(want):
        return [f"{label}: arrays {sorted(got)} != {sorted(want)}"]
    problems = []
    for array, x in want.items():
        y = np.asarray(got[array])
        if y.shape != x.shape:
            problems.append(f"{label}.{array}: shape {list(y.shape)} != {list(x.shape)}")
            continue
        if x.dtype.kind == "f":
            error = np.abs(y - x)
            budget = rtol * float(np.max(np.abs(x), initial=0.0))
        else:
            error, budget = (y != x), 0
        if np.any(error > budget):
            problems.append(f"{label}.{array}: differs from the stored array (max error "
                            f"{float(np.max(error)):.3g}, allowed {budget:.3g})")
    return problems


if __name__ == "__main__":  # the same as ``dla golden`` (backends/cli/golden.py)
    from dla_backends.cli import main

    sys.exit(main(["golden", *sys.argv[1:]]))
