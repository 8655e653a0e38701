"""`sparsedelta methods`: every method with its summary and its --option settings (from the registry)."""

from __future__ import annotations

import textwrap

NAME = "methods"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="list the methods and their --option settings")
    p.add_argument("method", nargs="?", help="one method's settings only")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..methods import method_names, runner_class
    from ..methods.base import TARGETING, as_flag, options_help

    names = [runner_class(args.method).name] if args.method else method_names()
    for name in names:
        runner = runner_class(name)
        print(f"{name}: {runner.summary}")
        if runner.takes_budget:
            print("  budget: --threshold T or --density D")
        flags = [as_flag(f) for f in TARGETING if f in runner.targeting_flags]
        print(f"  targeting: {', '.join(flags) or 'none (every parameter trains)'}")
        for option, default, text in options_help(runner):
            print(f"  --option {option}={default!r}")
            for line in textwrap.wrap(text, 96):
                print(f"      {line}")
        print()
    return 0
