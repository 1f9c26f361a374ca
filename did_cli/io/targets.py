"""What an output path is, decided by `os.stat` (never by its name), and how each kind is
written so that nothing it points at is lost.

- A regular file (or a new path) is replaced atomically: the data goes to a temporary file of
  its own beside it (`tempfile`: a unique name, created exclusively, never through a link) and
  is renamed over it, so a crash never leaves a half-written file.
- A symlink is followed: the file it points at is replaced (atomically, beside the target),
  the link stays a link.
- Anything else (a character device such as /dev/full or /dev/null, a named pipe, a socket), and
  the file this process's stdout or stderr already writes to (`-o /dev/stdout >> FILE`), is
  written straight through, never replaced. A regular file under /dev/ or /proc/ is a file.
- The standard streams: a stdout or stdin the process was started without (`>&-`, `<&-`) is
  one error when data is written to or read from it, never a traceback.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.errors import DidError, UsageError

CLOSED_STREAMS: set[int] = set()
"""Standard descriptors (0, 1, 2) this process was started without; /dev/null holds their place."""
MAX_PARTIALS = 1000
"""Recovery files (NAME.partial, NAME.2.partial, ...) one output may have before a run refuses."""


def reason(e: BaseException) -> str:
    """An OSError's strerror, else the first line of the message."""
    return getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def guard_std_streams() -> None:
    """Give /dev/null to the standard descriptors the process was started without, so that no
    file opened later takes descriptor 1 (and receives what a library prints), and remember
    them: `check_stdout` and `stdin_bytes` then refuse to use them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            CLOSED_STREAMS.add(fd)


def check_stdout() -> None:
    """DidError when stdout is closed (data would be lost), before any work."""
    if sys.stdout is None or 1 in CLOSED_STREAMS:
        raise DidError("cannot write stdout: it is closed; pass -o FILE (or give the command a stdout)")


def stdin_bytes() -> Any:
    """The binary layer of stdin (records and prompts are UTF-8 whatever PYTHONIOENCODING says);
    DidError when stdin is closed."""
    if sys.stdin is None or 0 in CLOSED_STREAMS:
        raise DidError("cannot read stdin: it is closed; pass a file instead of '-'")
    return getattr(sys.stdin, "buffer", sys.stdin)


def _std_identity() -> set[tuple[int, int]]:
    ids = set()
    for fd in (1, 2):
        if fd in CLOSED_STREAMS:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


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
    """Classify an output path by what it is and check that it can be written, before any work:
    a folder, a missing parent folder or one that is not writable raise DidError naming `path`."""
    p = Path(path)
    try:
        st = os.stat(p)  # follows symlinks
    except (FileNotFoundError, NotADirectoryError):  # new, or under a file (said below)
        st = None
    except OSError as e:
        raise DidError(f"cannot write {p}: {reason(e)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise DidError(f"cannot write {p}: it is a directory")
    if st is not None and (not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in _std_identity()):
        if not os.access(p, os.W_OK):
            raise DidError(f"cannot write {p}: permission denied")
        return Target(p, p, True)
    real = Path(os.path.realpath(p))
    parent = real.parent
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise DidError(f"cannot write {p}: {p.parent if not p.is_symlink() else parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK) or (st is not None and not os.access(real, os.W_OK)):
        raise DidError(f"cannot write {p}: permission denied")
    return Target(p, real, False)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (links followed); by path when either does not exist."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def refuse_inputs(t: Target, inputs: Iterable[str | Path | None], flag: str) -> None:
    """UsageError when the output `t` is one of the files the command reads (writing it would
    replace what is being read): `did show in.jsonl -o in.jsonl`, also through links and
    through stdin redirected from that file."""
    if t.special:
        return
    for src in inputs:
        if src is None:
            continue
        if str(src) == "-":
            if 0 in CLOSED_STREAMS:
                continue
            try:
                st, mine = os.fstat(0), os.stat(t.real)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                raise UsageError(f"{flag} {t.path} is the file stdin reads; choose another output")
        elif same_file(t.real, src):
            raise UsageError(
                f"{flag} {t.path} is also the input {src}: writing it would replace what is read; "
                "choose another output"
            )


def special_mode() -> str:
    """How a device, pipe or /dev/stdout is opened: appending, so that /dev/stdout redirected to
    a file (`>>` included) is not truncated by the reopen; devices and pipes ignore it."""
    return "ab"


def mode_for(real: Path) -> int:
    """Permission bits a replacement of `real` gets: its own, or the umask's for a new file."""
    try:
        return stat.S_IMODE(os.stat(real).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def folder_mode() -> int:
    """Permission bits of a new folder under the umask (mkdtemp makes private ones)."""
    return 0o777 & ~_UMASK


def new_partial(t: Target) -> tuple[Path, int]:
    """A recovery file of this run beside the target, opened for writing: NAME.partial, or the
    first free NAME.2.partial, NAME.3.partial, ... when an earlier run's is still there (it is
    never touched). Created exclusively and never through a link (O_EXCL | O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for k in range(1, MAX_PARTIALS + 1):
        p = t.real.with_name(t.real.name + (".partial" if k == 1 else f".{k}.partial"))
        try:
            fd = os.open(p, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise DidError(f"cannot write {t.path}: {reason(e)}") from None
        os.fchmod(fd, mode_for(t.real))
        return p, fd
    raise DidError(
        f"cannot write {t.path}: {MAX_PARTIALS} recovery files {t.real.name}.*partial are already there; "
        "recover or remove them"
    )


def unique_temporary(path: Path) -> Path:
    """A new empty file beside `path` with a name of its own (`.NAME.XXXXXXXX.tmp`, created
    exclusively, never through a link) for a writer that opens files by name (safetensors);
    the caller renames it over `path` or removes it."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise DidError(f"cannot write {path}: {reason(e)}") from None
    os.close(fd)
    return Path(tmp)


def write_bytes(path: str | Path, data: Any, fsync: bool = False) -> None:
    """Write `data` (text, or anything with the buffer protocol) to `path` as the module
    docstring says: atomically for files, straight through for devices and pipes. The temporary
    file has a name of its own per call (two writers never share one) and is removed on every
    failure path. Raises DidError naming `path`."""
    t = target(path)
    raw = utf8(data) if isinstance(data, str) else data
    if t.special:
        try:
            with open(t.path, special_mode(), buffering=0) as f:
                write_all(f, raw)
        except OSError as e:
            raise DidError(f"cannot write {t.path}: {reason(e)}") from None
        return
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=t.real.parent, prefix=f".{t.real.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode_for(t.real))
        os.replace(tmp, t.real)
        tmp = None
    except OSError as e:
        raise DidError(f"cannot write {t.path}: {reason(e)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_stdout(text: str | bytes) -> None:
    """Write `text` to stdout's binary layer (str as UTF-8, whatever PYTHONIOENCODING says) in
    one call and flush, so a downstream reader sees whole lines. A closed stdout or a failed
    write (a full disk behind `> FILE`) is one DidError; stdout then points at /dev/null so the
    interpreter's exit does not fail on the same buffer again. A closed pipe stays a
    BrokenPipeError (the CLI exits 0 on it: `| head` is not an error)."""
    check_stdout()
    raw = utf8(text) if isinstance(text, str) else text
    try:
        sys.stdout.flush()
        if hasattr(sys.stdout, "buffer"):
            sys.stdout.buffer.write(raw)
        else:  # a text-only stream (a notebook's)
            sys.stdout.write(raw.decode("utf-8", "replace"))
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise DidError(f"cannot write stdout: {e.strerror or e}") from None


def utf8(text: str) -> bytes:
    """`text` as UTF-8; a path given as non-UTF-8 bytes keeps its bytes (surrogateescape), and
    any other unpaired surrogate is written as its escape instead of stopping the write."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace")


def write_all(f: Any, raw: Any) -> None:
    """Write every byte of `raw` to the unbuffered file `f` (short writes looped over)."""
    data = memoryview(raw).cast("B")
    while data:
        data = data[f.write(data) or 0 :]


__all__ = [
    "CLOSED_STREAMS",
    "Target",
    "target",
    "same_file",
    "refuse_inputs",
    "special_mode",
    "mode_for",
    "folder_mode",
    "new_partial",
    "unique_temporary",
    "write_bytes",
    "write_stdout",
    "write_all",
    "utf8",
    "check_stdout",
    "stdin_bytes",
    "guard_std_streams",
    "reason",
]
