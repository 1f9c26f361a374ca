"""JSON Lines as users hand them to us: one decoder for every line of a records file, a prompts
file or a text source, so that every bad line fails the same way, in one line that names it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from did_cli.errors import DidError

MAX_DIGITS = 64
"""Digits of the longest integer a line may hold: no id, count or size of ours comes close, and
an integer checked before conversion cannot cost seconds (or Python's 4300-digit error)."""


def _int(text: str) -> int:
    if len(text) > MAX_DIGITS + 1:  # a sign and 64 digits
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_DIGITS})")
    return int(text)


def at(line_no: int | None, source: str | None) -> str:
    """'line 3 of FILE: ' (or the parts that are known; '' when neither is)."""
    if line_no is None and source is None:
        return ""
    if line_no is None:
        return f"{source}: "
    return f"line {line_no}" + (f" of {source}" if source is not None else "") + ": "


def decode(line: str, where: str, what: str = "a record") -> Any:
    """One line's JSON value. `where` prefixes the message ('line 3 of FILE: '); `what` names
    what a line should be, for the message about absurdly deep nesting."""
    try:
        return json.loads(line, parse_int=_int)
    except json.JSONDecodeError as e:
        raise DidError(f"{where}not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DidError(f"{where}JSON nested too deeply to be {what}") from None
    except ValueError as e:  # an integer literal longer than Python converts (4300 digits)
        raise DidError(f"{where}a number too long to be read ({' '.join(str(e).split())[:80]})") from None


def numbered(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of the lines that are not blank."""
    for no, line in enumerate(lines, 1):
        if line.strip():
            yield no, line


def objects(lines: Iterable[str], source: str, what: str = "a record") -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of every non-blank line; a bad line raises DidError naming
    it and `source`."""
    for no, line in numbered(lines):
        yield no, decode(line, at(no, source), what)


__all__ = ["MAX_DIGITS", "at", "decode", "numbered", "objects"]
