"""Outputs: what a path points at, checked before the work, locked while it is written, and
written so that nothing it points at is lost (did_cli.io.targets says how each kind of target
is written, did_cli.io.locks how writers exclude each other; this module is the front door).

- A regular file (or a new path) is replaced atomically through a temporary file of its own.
- A symlink is followed: the file it points at is replaced, the link stays a link.
- A character device, named pipe or socket (told by `os.stat`, not by the path) is written
  straight through, never replaced.
- A long-running writer (`did draft -o`, `did refine -o`) holds `NAME.lock` beside the target;
  a second writer of the same target is refused naming the first, and the lock of a process
  that no longer exists is taken over; a file at that name that is not our lock is refused.
- An output that is one of the command's inputs is refused before any work.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from did_cli.errors import DidError
from did_cli.io.locks import RUN_LOCK, Lock, check_free, hold_run_folder, lock_path, output_lock
from did_cli.io.targets import (
    Target,
    check_stdout,
    new_partial,
    reason,
    refuse_inputs,
    special_mode,
    target,
    unique_temporary,
    write_bytes,
    write_stdout,
)


def check_output(path: str | Path | None, flag: str, inputs: Iterable[str | Path | None] = ()) -> None:
    """Everything that can be checked about an output before the work: stdout open ('-'), the
    target writable, not one of `inputs`, not being written by another did process."""
    if path is None:
        return
    if str(path) == "-":
        check_stdout()
        return
    t = target(path)
    refuse_inputs(t, inputs, flag)
    check_free(t)


# ---------------------------------------------------------------------------------- folders


def describe_folder(path: Path, limit: int = 3) -> str:
    """What a folder holds, for an error message: 'a.txt, b/, c.bin and 4 more'."""
    try:
        names = sorted(
            p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir() if p.name != RUN_LOCK
        )
    except OSError as e:
        return f"unreadable: {reason(e)}"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_empty_folder(path: Path) -> bool:
    """Whether nothing is there: an empty folder (a run folder's own lock aside), or no such
    path at all (under a file included: creating it then fails with its own message)."""
    try:
        return all(p.name == RUN_LOCK for p in Path(path).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return not Path(path).is_file()
    except OSError:
        return False


def check_out_folder(path: str | Path, flag: str = "--out") -> Path:
    """An output folder that may be created: refuses a path that is a file (or lies under one)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DidError(f"{flag} {p}: exists and is not a folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DidError(f"{flag} {p}: {parent} is not a folder")
            break
    return p


__all__ = [
    "Target",
    "target",
    "check_output",
    "write_bytes",
    "write_stdout",
    "special_mode",
    "new_partial",
    "unique_temporary",
    "check_free",
    "Lock",
    "output_lock",
    "lock_path",
    "hold_run_folder",
    "describe_folder",
    "is_empty_folder",
    "check_out_folder",
]
