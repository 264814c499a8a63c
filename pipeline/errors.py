"""Exceptions that the command line turns into one-line messages."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (config, arguments, paths): one line, exit code 2."""

    exit_code = 2


class DataError(Exception):
    """The data, or where it lives, is wrong (e.g. a shard shorter than sizes.json says, a full
    disk): one line, exit code 1."""

    exit_code = 1
