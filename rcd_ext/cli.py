"""`rcd` console script: one subcommand per module in rcd_ext.commands.

Each command module defines `add_parser(subparsers)`, which registers its subparser and sets
`func` (called with the parsed namespace, returning an exit code). `rcd <cmd> ...` imports only
that command's module when the module bears the command's name (`rcd eval`, in `evaluate.py`,
imports them all); `rcd --help` and an unknown command import them all. Command modules
import only argparse and the light checks of rcd_ext.commands at module level; torch,
transformers and the rest load inside `func`, so `rcd --help` stays fast and a broken optional
dependency of one command does not take down the others.

Errors. A mistake of the user is one line on stderr, ``rcd <cmd>: <what> (<fix>)``, and exit
code 2, with no traceback:
- argparse's own errors (unknown option, bad choice, a `type=` check of rcd_ext.commands._usage);
- `UsageError` (rcd_ext.commands._usage), raised by the commands' checks before any model
  load, training or decoding;
- `ValueError` from the library (by this project's convention, raised at the boundary with the
  wrong value and what was expected) and the OS errors of user paths (`FileNotFoundError`,
  `PermissionError`, `IsADirectoryError`, `NotADirectoryError`); these carry a pointer to
  ``RCD_DEBUG=1``.
Anything else is a bug and keeps its traceback. ``RCD_DEBUG=1`` re-raises the user errors too,
with their tracebacks. Ctrl-C prints one line and exits 130.

`main(argv)` returns the exit code instead of raising SystemExit, for callers and tests.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import NoReturn

import rcd_ext.commands as commands_package
from rcd_ext.commands._usage import UsageError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``<prog>: <message> (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def command_names() -> list[str]:
    """The subcommands: the public modules of rcd_ext.commands, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(commands_package.__path__)
                  if not m.name.startswith("_"))


def _named_command(argv: list[str], names: list[str]) -> str | None:
    """The command `argv` names (its first word), if it is one of `names`."""
    words = [word for word in argv if not word.startswith("-")]
    return words[0] if words and words[0] in names else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `rcd` parser. With `argv` naming a command, only that command's module is imported
    (a broken optional dependency of another command cannot get in its way); otherwise every
    command is, for the top-level help and the "invalid choice" list."""
    parser = OneLineParser(prog="rcd", description="Residual Context Diffusion for diffusion LLMs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = command_names()
    named = _named_command(list(argv or []), names)
    for name in [named] if named else names:
        importlib.import_module(f"rcd_ext.commands.{name}").add_parser(subparsers)
    return parser


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError as 'reason: path')."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _exit_code(request: SystemExit) -> int:
    if request.code is None or isinstance(request.code, int):
        return request.code or 0
    print(request.code, file=sys.stderr)  # SystemExit("message"): Python would exit 1
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run `rcd` with `argv` (default sys.argv[1:]); returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as request:  # --help (0), or a usage error already printed (2)
        return _exit_code(request)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prog = f"rcd {args.command}"
    debug = os.environ.get("RCD_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        if debug:
            raise
        print(f"{prog}: {one_line(error)}", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: {one_line(error)} (RCD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
