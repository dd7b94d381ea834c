"""The ``dla`` command: ``dla demo``, ``dla check``, ``dla bench``, ``dla golden``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> exit code``; only the module of the chosen subcommand is imported, so
``dla golden`` does not pay for torch.

Bad input never ends in a traceback: every option is parsed by one of the ``type=``
checkers below (``count``, ``number``, ``comma_list``, ``output_path``), and what only a
combination of options can rule out (more segments than tokens, ``--device cuda`` without
a device) is raised by ``run`` as ``UsageError``; both print the usage and exit 2.
``--tau -inf`` works (argparse alone reads ``-inf`` as an option). Output piped into a
reader that stops early (``dla bench | head``) ends quietly.

docs/benchmarks.md documents ``dla bench``; README.md the others.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

SUBCOMMANDS = {
    "demo": ("dla_backends.cli.demo", "DLA on a built-in synthetic stream, against the baselines"),
    "check": ("dla_backends.cli.check", "the differential suite for one backend"),
    "bench": ("dla_backends.cli.bench", "the benchmark workloads, checked, then timed"),
    "golden": ("dla_backends.cli.golden", "check (or rewrite) the golden vectors"),
    "train": ("dla_backends.cli.train", "train a tiny DLA model on a synthetic recall task"),
}


class UsageError(Exception):
    """A request the parser could not rule out alone; ``main`` prints usage and exits 2."""


# --- option types: each raises ArgumentTypeError, which argparse turns into usage + exit 2 --


def count(minimum: int):
    """An int option that must be >= ``minimum`` (``count(1)``: a positive count)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def number(*, finite: bool = False, positive: bool = False):
    """A float option: never NaN; also finite or > 0 when asked (``-inf`` is a number)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or (finite and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"must be a {'finite ' if finite else ''}number, "
                                             f"got {text!r}")
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def comma_list(known: list[str]):
    """A comma-separated list of names, each one of ``known`` (empty: all of them)."""

    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown)}; known: "
                                             f"{', '.join(known)}")
        return names

    parse.__name__ = "list"
    return parse


def output_path(suffix: str):
    """A path to write: it ends in ``suffix`` and its directory exists and is writable.

    Checked when parsing, so that a long run does not fail at its very end.
    """

    def parse(text: str) -> str:
        if not text.lower().endswith(suffix):
            raise argparse.ArgumentTypeError(f"{text!r} does not end in {suffix}")
        directory = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(directory):
            raise argparse.ArgumentTypeError(f"directory {directory!r} does not exist")
        if not os.access(directory, os.W_OK):
            raise argparse.ArgumentTypeError(f"directory {directory!r} is not writable")
        return text

    parse.__name__ = f"{suffix} path"
    return parse


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--tau -inf`` -> ``--tau=-inf``: a value that parses as a negative number.

    argparse takes ``-3`` and ``-0.5`` as values but reads ``-inf`` and ``-1e3`` as
    unknown options; joining them to their option with ``=`` is unambiguous.
    """
    out = []
    for arg in argv:
        previous = out[-1] if out else ""
        if (arg.startswith("-") and is_number(arg) and previous.startswith("-")
                and previous != "--" and "=" not in previous):
            out[-1] = f"{previous}={arg}"
        else:
            out.append(arg)
    return out


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- the command ---------------------------------------------------------------------------


def build_parser(chosen: str | None):
    """The ``dla`` parser, with the arguments of the ``chosen`` subcommand only.

    Returns (parser, {name: subparser}, {name: module}).
    """
    parser = argparse.ArgumentParser(prog="dla", description="Dynamic Linear Attention")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    children, modules = {}, {}
    for name, (module, help_) in SUBCOMMANDS.items():
        children[name] = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(children[name])
    return parser, children, modules


def main(argv=None) -> int:
    argv = attach_negative_values(sys.argv[1:] if argv is None else list(argv))
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser, children, modules = build_parser(chosen)
    args = parser.parse_args(argv)
    try:
        code = modules[args.command].run(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
        return code
    except UsageError as exc:
        children[args.command].error(str(exc))  # prints usage, exits 2
    except BrokenPipeError:
        # The reader stopped (``| head``): end quietly, and keep Python's own flush of
        # stdout at exit from raising again (the recipe of the signal module's docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
