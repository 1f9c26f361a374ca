"""Writing sample records: one whole JSON line at a time, to a file or stdout, so that nothing a
crash or Ctrl-C interrupts is lost or left half-written (docs/reliability.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from did_cli.errors import DidError


def dumps(rec: dict) -> str:
    """One record as one JSON line (no trailing newline). NaN/inf are refused, not written. A
    string that is not valid Unicode (a path given as non-UTF-8 bytes) is written as its JSON
    escape, so the line is always UTF-8."""
    try:
        line = json.dumps(rec, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise DidError(f"record {rec.get('id', '?')!r} is not valid JSON: {e}") from None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(rec, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return line


class RecordWriter:
    """Write records as JSONL to a file or stdout, one whole line at a time.

    ``RecordWriter(None)`` or ``RecordWriter("-")`` writes to stdout. A file path is checked
    and locked at construction (did_cli.io.outputs), so an unwritable destination, or one that
    another process is writing, fails before any work. Records go to a recovery file of this
    run, ``<path>.partial`` (or ``<path>.2.partial``, ... when an earlier run's is still there:
    it is never overwritten), created exclusively and never through a link, and renamed to
    ``<path>`` when the writer closes without an error; after a crash or Ctrl-C the final path
    is untouched and the recovery file holds every record written so far, each on a complete
    line (a write that fails midway is truncated back to the previous line end); `kept` names
    it then. A symlink is followed (its target is replaced); a device, named pipe or socket is
    written straight through and never replaced.
    """

    def __init__(self, dest: str | Path | None, what: str = "did"):
        from did_cli.io.outputs import check_stdout, new_partial, output_lock, special_mode, target

        self.dest = None if dest is None or str(dest) == "-" else Path(dest)
        self.count = 0
        self._good = 0
        self._fh: IO[bytes] | None = None
        self._lock = None
        self.partial: Path | None = None
        self.kept: Path | None = None
        if self.dest is None:
            check_stdout()
            self.name = "stdout"
            return
        self.name = str(self.dest)
        self._target = target(self.dest)
        self._lock = output_lock(self._target, what)
        try:
            if self._target.special:
                self._fh = open(self.dest, special_mode(), buffering=0)
            else:
                self.partial, fd = new_partial(self._target)
                self._fh = os.fdopen(fd, "wb", buffering=0)
        except BaseException as e:
            if self._lock is not None:
                self._lock.release()
            if isinstance(e, OSError):
                raise DidError(f"cannot write {self.dest}: {e.strerror or e}") from None
            raise

    def write(self, rec: dict) -> None:
        line = dumps(rec) + "\n"
        if self._fh is None:
            if self.dest is not None:
                raise DidError(f"{self.name}: writer is closed")
            from did_cli.io.outputs import write_stdout

            write_stdout(line)
        else:
            data = memoryview(line.encode("utf-8"))
            try:
                # unbuffered: loop over short writes so nothing sits in a hidden buffer
                while data:
                    data = data[self._fh.write(data) or 0 :]
            except BaseException as e:
                # drop a half-written line so the file never ends mid-record
                if self.partial is not None:  # a pipe or device cannot be truncated
                    try:
                        self._fh.truncate(self._good)
                        self._fh.seek(self._good)
                    except (OSError, ValueError):
                        pass
                if isinstance(e, OSError):
                    kept = f" ({self.partial} keeps the {self.count} records written)" if self._good else ""
                    raise DidError(f"cannot write {self.name}: {e.strerror or e}{kept}") from None
                raise
            if self.partial is not None:
                self._good = self._fh.tell()
        self.count += 1

    def close(self, ok: bool = True) -> None:
        """Finish the file: rename the recovery file to the final name when `ok`, else leave it
        when it holds a record (`kept` then names it; removed when empty); the lock goes either
        way."""
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.close()
            if ok and self.partial is not None:
                os.replace(self.partial, self._target.real)
            elif self.partial is not None and self._good == 0:  # nothing to recover: no leftover
                self.partial.unlink(missing_ok=True)
            elif self.partial is not None:
                self.kept = self.partial
        except OSError as e:
            if ok:
                raise DidError(f"cannot write {self.name}: {e.strerror or e}") from None
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


__all__ = ["dumps", "RecordWriter"]
