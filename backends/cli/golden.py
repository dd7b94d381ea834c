"""``dla golden``: check the stored golden vectors against the reference, or rewrite them.

    dla golden                 every stored case: checksums, and today's reference output
    dla golden --write         recompute every case and rewrite the files (deliberate change)
    dla golden --dir PATH      another directory of cases (e.g. a C++ test's copy)

The cases, their file format and the manifest are dla_backends.testing.golden's; this
module only parses the options and prints. Exit 0 when every case matches, 1 when one
does not (each problem on its own line), 2 on bad usage.

docs/golden-vectors.md documents the files.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--write", action="store_true",
                        help="recompute every case with the reference and rewrite the files")
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="directory of the cases (default: the package's own)")


def run(args) -> int:
    from ..testing import golden

    from . import UsageError

    directory = golden.DIRECTORY if args.dir is None else args.dir
    if args.write:
        if not directory.parent.is_dir():
            raise UsageError(f"--dir: {str(directory.parent)!r} does not exist")
        manifest = golden.write(directory)
        print(f"wrote {len(manifest['cases'])} cases and manifest.json to {directory}")
        return 0
    if not (directory / "manifest.json").is_file():
        raise UsageError(f"--dir: no manifest.json in {str(directory)!r}")
    problems = [problem for name in golden.read_manifest(directory)["cases"]
                for problem in golden.checksum_problems(name, directory)
                + golden.drift(name, directory)]
    print("\n".join(problems) or f"all golden cases in {directory} match the reference")
    return 1 if problems else 0
