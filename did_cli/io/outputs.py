"""Output targets: what a path points at, checked before the work, locked while it is written,
and written so that nothing it points at is lost.

- A regular file (or a new path) is replaced atomically: the data goes to a temporary name
  beside it and is renamed over it, so a crash never leaves a half-written file.
- A symlink is followed: the file it points at is replaced (atomically, beside the target),
  the link stays a link.
- Anything else (a character device such as /dev/full or /dev/null, a named pipe, a socket,
  /dev/stdout) is written straight through, never replaced.
- A long-running writer (`did draft -o`, `did refine -o`) holds `NAME.lock` beside the target,
  created exclusively and holding its pid; a second writer of the same target is refused naming
  that pid, and the lock of a process that no longer exists is taken over.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.errors import DidError

# paths that name a stream of this process, not a file to replace
_STREAM_PREFIXES = ("/dev/", "/proc/")


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


@dataclass(frozen=True)
class Target:
    """Where an output goes: `path` as given, `real` with symlinks followed, and whether it is
    written straight through (`special`) instead of replaced."""

    path: Path
    real: Path
    special: bool

    @property
    def kind(self) -> str:
        try:
            mode = os.stat(self.path).st_mode
        except OSError:
            return "new"
        for test, name in (
            (stat.S_ISCHR, "character device"),
            (stat.S_ISFIFO, "named pipe"),
            (stat.S_ISSOCK, "socket"),
            (stat.S_ISBLK, "block device"),
            (stat.S_ISREG, "file"),
        ):
            if test(mode):
                return name
        return "special file"


def target(path: str | Path) -> Target:
    """Classify an output path and check that it can be written, before any work: a folder, a
    missing parent folder or one that is not writable raise DidError naming `path`."""
    p = Path(path)
    try:
        st = os.stat(p)  # follows symlinks
    except (FileNotFoundError, NotADirectoryError):  # new, or under a file (said below)
        st = None
    except OSError as e:
        raise DidError(f"cannot write {p}: {_reason(e)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise DidError(f"cannot write {p}: it is a directory")
    stream = str(p.absolute()).startswith(_STREAM_PREFIXES)
    if st is not None and (not stat.S_ISREG(st.st_mode) or stream):
        if not os.access(p, os.W_OK):
            raise DidError(f"cannot write {p}: permission denied")
        return Target(p, p, True)
    real = Path(os.path.realpath(p))
    parent = real.parent if p.is_symlink() else p.parent
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise DidError(f"cannot write {p}: {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK) or (st is not None and not os.access(real, os.W_OK)):
        raise DidError(f"cannot write {p}: permission denied")
    return Target(p, real, False)


def special_mode() -> str:
    """How a device, pipe or /dev/stdout is opened: appending, so that /dev/stdout redirected to
    a file (`>>` included) is not truncated by the reopen; devices and pipes ignore it."""
    return "ab"


def _mode_for(real: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(real).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def write_bytes(path: str | Path, data: Any, fsync: bool = False) -> None:
    """Write `data` (text, or anything with the buffer protocol) to `path` as the module
    docstring says: atomically for files, straight through for devices and pipes. The temporary
    file has a name of its own per call (two writers never share one) and is removed on every
    failure path. Raises DidError naming `path`."""
    t = target(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if t.special:
        try:
            with open(t.path, special_mode(), buffering=0) as f:
                _write_all(f, raw)
        except OSError as e:
            raise DidError(f"cannot write {t.path}: {_reason(e)}") from None
        return
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=t.real.parent, prefix=f".{t.real.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(t.real))
        os.replace(tmp, t.real)
        tmp = None
    except OSError as e:
        raise DidError(f"cannot write {t.path}: {_reason(e)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_stdout(text: str | bytes) -> None:
    """Write `text` (str, or bytes to the binary layer) to stdout in one call and flush, so a
    downstream reader sees whole lines. A
    failed write (a full disk behind `> FILE`) is one DidError; stdout then points at /dev/null so
    the interpreter's exit does not fail on the same buffer again. A closed pipe stays a
    BrokenPipeError (the CLI exits 0 on it: `| head` is not an error)."""
    import sys

    try:
        if isinstance(text, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(text)
        else:
            sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise DidError(f"cannot write stdout: {e.strerror or e}") from None


def _write_all(f: Any, raw: Any) -> None:
    data = memoryview(raw).cast("B")
    while data:
        data = data[f.write(data) or 0 :]


# ------------------------------------------------------------------------------------ locks


def lock_path(t: Target) -> Path:
    return t.real.with_name(t.real.name + ".lock")


def _holder(lock: Path) -> int | None:
    """The pid in a lock file when that process is alive (None for a stale or unreadable lock)."""
    try:
        text = lock.read_text().split()
        pid, host = int(text[0]), (text[1] if len(text) > 1 else socket.gethostname())
    except (OSError, ValueError, IndexError):
        return None
    if host != socket.gethostname():
        return pid  # another machine's process: cannot be checked, so it counts as alive
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _busy(t: Target, pid: int) -> DidError:
    return DidError(
        f"cannot write {t.path}: another did process (pid {pid}) is writing it "
        f"(lock {lock_path(t)}); wait for it or choose another output"
    )


def check_free(t: Target) -> None:
    """Raise DidError when a live process holds the lock of `t` (before any work)."""
    if t.special:
        return
    pid = _holder(lock_path(t))
    if pid is not None:
        raise _busy(t, pid)


class Lock:
    """The exclusive lock of one output target (no lock for devices and pipes)."""

    def __init__(self, t: Target):
        self.target = t
        self.path: Path | None = None
        if t.special:
            return
        lock = lock_path(t)
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _holder(lock)
                if pid is not None:
                    raise _busy(t, pid) from None
                try:  # stale: its process is gone
                    lock.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise DidError(
                        f"cannot write {t.path}: cannot remove stale lock {lock} ({_reason(e)})"
                    ) from None
                continue
            except OSError as e:
                raise DidError(f"cannot write {t.path}: {_reason(e)}") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.path = lock
            return
        raise DidError(f"cannot write {t.path}: could not take the lock {lock}")

    def release(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            self.path = None


# ---------------------------------------------------------------------------------- folders


def describe_folder(path: Path, limit: int = 3) -> str:
    """What a folder holds, for an error message: 'a.txt, b/, c.bin and 4 more'."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir())
    except OSError as e:
        return f"unreadable: {_reason(e)}"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_empty_folder(path: Path) -> bool:
    """Whether nothing is there: an empty folder, or no such path at all (under a file
    included: creating it then fails with its own message)."""
    try:
        return not any(Path(path).iterdir())
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
    "write_bytes",
    "special_mode",
    "check_free",
    "Lock",
    "lock_path",
    "describe_folder",
    "is_empty_folder",
    "check_out_folder",
]
