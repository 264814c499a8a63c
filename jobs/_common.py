"""Glue shared by the job entrypoints: environment defaults, error → exit-code mapping."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

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
