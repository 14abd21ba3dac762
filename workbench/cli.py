"""The ``workbench`` command line.

Each subcommand lives in its own module under :mod:`workbench.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that
runs it. ``workbench <command> --help`` documents each one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

COMMANDS = ("info", "predict", "train_toy", "train_mend", "trace", "sweep", "edit", "reproduce", "demo")
"""Modules of :mod:`workbench.commands`, in the order ``--help`` lists them."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (what is wrong, and where the help is), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: object) -> str:
    """``text`` on one line (tracebacks of libraries put newlines in their messages)."""
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="workbench",
        description="Locate facts in language models by causal tracing, and edit them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"workbench.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"workbench.commands.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    parser.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    for command in sub.choices.values():  # also accepted after the command: `workbench demo --quiet`
        if not command.get_default("passthrough"):
            command.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


QUIET_HELP = "no progress bars or progress lines and no step notes; warnings, errors and results still show"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the one at creation)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """Show the package's INFO log records (progress notes such as ``layer_stats``) on stderr, once."""
    log = logging.getLogger("workbench")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``workbench`` console script."""
    _log_to_stderr()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        # Pass everything after the command on verbatim: parse_known_args would split
        # "--out DIR" into an unknown option and a stray positional.
        words = list(sys.argv[1:] if argv is None else argv)
        args.rest = words[words.index(args.command) + 1:]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.quiet:
        from .progress import set_progress

        set_progress("off")
        logging.getLogger("workbench").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from .editing.presets import strict_presets

        with strict_presets(bool(getattr(args, "strict_presets", False))):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as err:  # the workbench's own errors name the input and the fix
        if getattr(args, "debug", False):
            raise
        print(f"workbench {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - anything else is still one line, not a traceback
        if getattr(args, "debug", False):
            raise
        print(f"workbench {args.command}: error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for "
              f"the traceback)", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
