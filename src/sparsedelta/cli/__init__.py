"""`sparsedelta train | eval | inspect | merge | compose | predict | export | import | analyze | methods |
estimate | serve`: a thin argparse layer over the public API, one module per subcommand.

Mistakes a user can fix (the library's UsageError and DeltaFileError, and operating-system errors on the
user's paths) are printed as one line naming the problem and the fix (exit status 2); SPARSEDELTA_DEBUG=1
shows the traceback instead. Any other exception is a bug in sparsedelta: its traceback is printed and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..core.io import DeltaFileError
from ..errors import UsageError
from . import analyze, compose, estimate, evaluate, export, import_, inspect, merge, methods, predict, serve, train

USER_ERRORS = (UsageError, DeltaFileError, OSError)
SUBCOMMANDS = (train, evaluate, inspect, merge, compose, predict, export, import_, analyze, methods, estimate, serve)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="sparsedelta",
        description="Selective fine-tuning by unstructured masking: each task is a sparse delta over a frozen model.",
    )
    parser.add_argument("--version", action="version", version=f"sparsedelta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(m.NAME for m in SUBCOMMANDS) + "}")
    for module in SUBCOMMANDS:
        module.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("sparsedelta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as e:
        if os.environ.get("SPARSEDELTA_DEBUG"):
            raise
        print(f"sparsedelta {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(
            f"sparsedelta {args.command}: internal error (a bug in sparsedelta, not a mistake of yours); "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1

