"""`sparsedelta train | eval | inspect | merge | compose | predict | export | import | analyze | methods |
estimate`: a thin argparse layer over the public API, one module per subcommand.

Mistakes a user can fix are printed as one line naming the problem and the fix (exit status 2);
SPARSEDELTA_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..core.io import DeltaFileError
from ..errors import UsageError
from . import analyze, compose, estimate, evaluate, export, import_, inspect, merge, methods, predict, train

ERRORS = (UsageError, DeltaFileError, FileNotFoundError, ValueError, KeyError)
SUBCOMMANDS = (train, evaluate, inspect, merge, compose, predict, export, import_, analyze, methods, estimate)


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
    except ERRORS as e:
        if os.environ.get("SPARSEDELTA_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        hint = "" if isinstance(e, (UsageError, DeltaFileError)) else " (SPARSEDELTA_DEBUG=1 shows the traceback)"
        print(f"sparsedelta {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2

