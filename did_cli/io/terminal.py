"""Text from user data on the terminal: record ids, prompts, file names and library messages
reach stderr with their control characters escaped (an id holding `ESC [2J` must not clear the
screen or fake a line) and are never read as Rich markup (an id `[/bold]x` is text, not a tag).
"""

from __future__ import annotations

import re
import sys

# C0 and C1 controls, DEL, and the bidirectional overrides that can reorder what a line shows
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    c = m.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
        f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    )


def printable(text: object) -> str:
    """`text` with every control character (newlines included: one message is one line) and
    bidirectional override written as its escape; an unpaired surrogate as its escape too."""
    s = _UNSAFE.sub(_escape, str(text))
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def say(line: str) -> None:
    """One line on stderr, escaped and flushed (stderr may be closed: then nothing)."""
    if sys.stderr is None:
        return
    try:
        print(printable(line), file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a terminal that went away (SIGHUP), a closed stream
        pass


__all__ = ["printable", "say"]
