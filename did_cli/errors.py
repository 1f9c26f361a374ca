"""Errors that the CLI turns into one-line messages and exit codes (no tracebacks)."""


class DidError(Exception):
    """A runtime failure the user can act on (exit 1)."""

    exit_code = 1


class UsageError(DidError, ValueError):
    """Bad input from the user (an option, a setting): the message names the flag (exit 2).

    Also a ValueError, so library callers that pass a bad setting get the conventional type."""

    exit_code = 2
