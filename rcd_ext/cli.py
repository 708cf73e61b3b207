"""`rcd` console script: one subcommand per module in rcd_ext.commands.

Each command module defines `add_parser(subparsers)`, which registers its subparser and sets
`func` (called with the parsed namespace, returning an exit code). Modules are imported lazily
per invocation so `rcd --help` stays fast and a broken optional dependency of one command does
not take down the others.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import rcd_ext.commands as commands_package


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcd", description="Residual Context Diffusion for diffusion LLMs"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands_package.__path__),
                              key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"rcd_ext.commands.{module_info.name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
