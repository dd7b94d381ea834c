"""The ``dla`` command: ``dla demo``, ``dla check --backend NAME``, ``dla bench``.

Each subcommand lives in its own module, with ``add_arguments(parser)`` and
``run(args) -> exit code``; only the module of the chosen subcommand is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("dla_backends.cli.demo", "DLA on a built-in synthetic stream, against the baselines"),
    "check": ("dla_backends.cli.check", "the differential suite for one backend"),
    "bench": ("dla_backends.cli.bench", "the benchmark workloads, checked, then timed"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="dla", description="Dynamic Linear Attention")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module, help_) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(child)
    args = parser.parse_args(argv)
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
