"""Errors that the CLI turns into one-line messages and exit codes (no tracebacks)."""


class DidError(Exception):
    """A runtime failure the user can act on (exit 1)."""

    exit_code = 1


class UsageError(DidError):
    """Bad command-line input: the message names the flag (exit 2)."""

    exit_code = 2
