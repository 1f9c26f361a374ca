"""Text from user data on the terminal: record ids, prompts, file names and library messages
reach stderr with their control characters escaped (an id holding `ESC [2J` must not clear the
screen or fake a line) and are never read as Rich markup (an id `[/bold]x` is text, not a tag).
"""

from __future__ import annotations

import re
import sys
import time

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


def seconds_text(s: float) -> str:
    """'42 s', '3 min 5 s', '2 h 10 min'."""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Ticker:
    """Progress lines for logs and pipes, where a bar cannot redraw: `PREFIX: WHAT done/total
    UNIT, T so far, about T left`, first once the work looks longer than `quiet` seconds, then
    at most every `every` seconds."""

    def __init__(self, prefix: str, total: int, unit: str, every: float = 30.0, quiet: float = 10.0):
        self.prefix, self.total, self.unit, self.every, self.quiet = prefix, total, unit, every, quiet
        self.t0 = time.perf_counter()
        self.last = None
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        spent = now - self.t0
        if not self.done or self.done >= self.total or spent * self.total / self.done < self.quiet:
            return
        if self.last is not None and now - self.last < self.every:
            return
        self.last = now
        left = spent / self.done * (self.total - self.done)
        say(
            f"{self.prefix} {self.done}/{self.total} {self.unit}, {seconds_text(spent)} so far, about "
            f"{seconds_text(left)} left"
        )


__all__ = ["printable", "say", "seconds_text", "Ticker"]
