"""The ``dla`` command: ``dla demo``, ``dla check --backend NAME``, ``dla bench``.

Each subcommand lives in its own module and is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("dla_backends.demo", "DLA on a built-in synthetic stream, against the baselines"),
    "check": ("dla_backends.check", "the differential suite for one backend"),
    "bench": ("dla_backends.bench", "the benchmark workloads, checked, then timed"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dla", description="Dynamic Linear Attention")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_) in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(sub.add_parser(name, help=help_,
                                                   description=modules[name].__doc__))
    args = parser.parse_args(argv)
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
