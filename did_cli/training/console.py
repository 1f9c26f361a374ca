"""What a training run shows on stderr (a rich bar on a terminal, plain lines otherwise) and
how it answers Ctrl-C (finish the step, save, stop; a second Ctrl-C stops at once)."""

from __future__ import annotations

import signal
import sys
import threading
import time

from did_cli.io.terminal import printable, say


class TrainProgress:
    """A rich bar on a terminal; plain lines every log_every steps otherwise (main process)."""

    def __init__(self, enabled: bool, total: int, start: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str, line: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif line:
            print(f"did {self.label}: step {step}/{self.total} {info}", file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        """A line above the bar (or a plain line); never read as Rich markup, controls escaped."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(printable(msg), markup=False, highlight=False)
        else:
            say(f"did {self.label}: {msg}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}K" if x >= 1e3 else f"{x:.0f}"


class Interrupt:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts now."""

    def __init__(self):
        self.flag = False
        self.old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.flag = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


class LogWindow:
    """Loss and throughput since the last metrics line."""

    def __init__(self):
        self.loss, self.n, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()
        self.last_loss, self.rate = float("nan"), 0.0

    def close(self) -> None:
        dt = time.perf_counter() - self.t0
        self.rate = self.tokens / dt if dt > 0 else 0.0
        self.last_loss = self.loss / self.n if self.n else float("nan")
        self.loss, self.n, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()
