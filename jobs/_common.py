"""Glue shared by the job entrypoints: environment defaults, error → exit-code mapping."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pipeline.env import apply_defaults

apply_defaults()

from pipeline.errors import DataError, UsageError  # noqa: E402


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error to stderr and return ``code``."""
    print(f"diffin: error: {message}", file=sys.stderr)
    return code


def run_cli(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a job function, turning known errors into one-line messages and exit codes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(run(args) or 0)
    except UsageError as exc:
        return fail(str(exc), UsageError.exit_code)
    except DataError as exc:
        return fail(str(exc), DataError.exit_code)
    except KeyboardInterrupt:
        return fail("interrupted", 130)


def standalone(add_arguments: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], int | None], description: str,
               argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.<name>``: parse ``argv`` and run."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(run, args)


def run_subcommand(args: argparse.Namespace) -> int | None:
    """Run the action argparse chose for a job with sub-actions (``args.func``)."""
    return args.func(args)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (argparse turns the error into exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


@dataclass(frozen=True)
class SimpleJob:
    """A job with one set of arguments: ``diffin <name>`` and ``python -m jobs.<module>``."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]

    def register(self, subparsers: argparse._SubParsersAction) -> None:
        """Add the job to the ``diffin`` command."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description)
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Entry point of ``python -m jobs.<module>``."""
        return standalone(self.add_arguments, self.run, self.description, argv)


def bench_command(name: str, args: argparse.Namespace, out: str, optional: Sequence[tuple[str, Any]]) -> str:
    """The canonical ``diffin bench NAME …`` command that reproduces ``args`` (``--quick``,
    ``--out``, ``--data-dir``, ``--threads``, then ``optional``: (flag, value) pairs added when
    the value is set; True: a switch without value)."""
    parts = ["diffin", "bench", name] + (["--quick"] if args.quick else [])
    parts += ["--out", out, "--data-dir", args.data_dir, "--threads", str(args.threads)]
    for flag, value in optional:
        if value is True:  # a switch
            parts.append(flag)
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)
