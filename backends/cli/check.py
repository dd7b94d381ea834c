"""``dla check --backend NAME``: the differential suite for one backend, with a summary.

    dla check --backend numba                 20 drawn cases per backbone, seed 0
    dla check --backend torch@cuda --examples 200 --seed 7

Runs a fixed, seeded set of cases through the checks of ``dla_backends.testing`` (the
same ones as tests/test_differential.py): the named regression cases, then EXAMPLES
drawn cases per backbone. Prints one row per group (cases, passed, failed, skipped as
not applicable, the largest share of a tolerance budget used), the failures with their
reproducers, and exits 1 if any case failed, 2 if the name is unknown or the backend
cannot run here. The names are the kit's table (``dla_backends.testing.BACKENDS``),
written NAME[/NAMESPACE][@DEVICE][:DTYPE].

docs/testing-your-kernel.md explains the checks and the tolerances.
"""

from __future__ import annotations

import sys

BACKBONES = ("linear", "mamba2", "gdn")


def add_arguments(parser) -> None:
    from .. import testing
    from . import count

    parser.add_argument("--backend", required=True, type=backend_name,
                        help=f"a test backend: {', '.join(testing.BACKENDS)}, written "
                             "NAME[/NAMESPACE][@DEVICE][:DTYPE], e.g. triton@cuda:float16")
    parser.add_argument("--examples", type=count(0), default=20, metavar="N",
                        help="drawn cases per backbone (default 20)")
    parser.add_argument("--seed", type=count(0), default=0,
                        help="seed of the drawn cases (default 0)")


def backend_name(text: str) -> str:
    """A name the kit's table knows (else a usage error listing the known ones)."""
    import argparse

    from .. import testing

    try:
        testing.get_backend(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def run(args) -> int:
    from .. import testing

    testing.interpret_triton_without_cuda()
    ok, why = testing.availability(args.backend)
    if not ok:
        print(f"dla check: backend {args.backend} cannot run here: {why}", file=sys.stderr)
        return 2
    return check_candidate(testing.get_backend(args.backend), args.seed, args.examples)


def check_candidate(candidate, seed: int, examples: int) -> int:
    """Check ``candidate`` on the named cases and ``examples`` seeded cases per backbone.

    Prints the summary table and the failures; returns the exit code (1 if any failed).
    """
    from .. import testing

    groups = {"named cases": list(testing.NAMED_CASES.values())}
    for number, backbone in enumerate(BACKBONES):
        groups[backbone] = testing.seeded_specs(seed + number, examples, backbone)
    print(f"dla check: {candidate.label}, inputs {candidate.dtype}, state "
          f"{candidate.state_dtype}, seed {seed}")
    print(f"{'group':<14}{'cases':>7}{'passed':>8}{'failed':>8}{'skipped':>9}"
          f"{'max error / tolerance':>23}")
    failures, skips = [], {}
    for group, specs in groups.items():
        row = run_group(candidate, specs, failures, skips)
        print(f"{group:<14}{len(specs):>7}{row['passed']:>8}{row['failed']:>8}"
              f"{row['skipped']:>9}{row['used']:>23.2g}")
    for reason, count in skips.items():
        print(f"\nskipped {count} case(s) as not applicable: {reason}")
    for spec, message in failures:
        print(f"\nFAILED {spec!r}\n{message}")
    print(f"\n{'FAILED' if failures else 'passed'}: {len(failures)} failing case(s)")
    return 1 if failures else 0


def run_group(candidate, specs, failures, skips) -> dict:
    """Counts of one group's outcomes; records each failure and each reason to skip.

    failures: a list that gets (spec, message) per failing case; skips: a dict that
    counts the NotImplementedError messages (the backend's "not applicable").
    """
    from .. import testing

    row = dict(passed=0, failed=0, skipped=0, used=0.0)
    for spec in specs:
        try:
            used = testing.check_case(candidate, testing.build_case(spec))
        except NotImplementedError as exc:
            row["skipped"] += 1
            skips[str(exc)] = skips.get(str(exc), 0) + 1
        except AssertionError as exc:
            row["failed"] += 1
            failures.append((spec, str(exc)))
        else:
            row["passed"] += 1
            row["used"] = max(row["used"], used)
    return row
