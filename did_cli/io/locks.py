"""Locks: one writer per output file (`NAME.lock` beside it) and one training process per run
folder (`RUN/.did.lock`).

A lock is a file holding one line, `did-lock/1 pid=N host=H what=did draft`, that its process
holds an exclusive `flock` on for as long as it runs. It appears whole: it is written and locked
under a temporary name, then linked into place (`link` fails when the name exists). So:

- a live holder is recognised by the flock, not by guessing from its pid (a reused pid, or a
  pid of another machine, cannot keep a lock alive);
- a lock whose process is gone (killed with SIGKILL) is free: the next process takes it over;
- a file at the lock's name that is not such a lock (the user's own `out.jsonl.lock`, a link)
  is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from did_cli.errors import DidError
from did_cli.io.targets import Target, reason

TAG = "did-lock/1"
RUN_LOCK = ".did.lock"
"""The lock of a run folder, inside it (ignored when judging whether a folder is empty)."""
_LINE = re.compile(r"^did-lock/1 pid=(\d+) host=(\S+) what=(.*)$")
_FLAGS = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def lock_path(t: Target) -> Path:
    return t.real.with_name(t.real.name + ".lock")


def _parse(raw: bytes) -> dict | None:
    m = _LINE.match(raw.decode("utf-8", "replace").strip())
    return None if m is None else {"pid": int(m[1]), "host": m[2], "what": m[3]}


def _read(fd: int) -> dict | None:
    return _parse(os.pread(fd, 4096, 0)) if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _open_existing(path: Path, subject: str) -> int | None:
    """A descriptor of the lock file at `path`, or None when there is none (any more)."""
    try:
        return os.open(path, _FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink at the lock's name is not a lock of ours
        raise _foreign(path, subject, reason(e)) from None


def _foreign(path: Path, subject: str, why: str = "") -> DidError:
    return DidError(
        f"{subject}: {path} exists and is not a did lock{f' ({why})' if why else ''}; remove it if "
        "nothing uses it"
    )


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _names_fd(path: Path, fd: int) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Lock:
    """An exclusive lock at `path` for `what` (e.g. 'did draft'). `busy(info)` makes the
    DidError raised when a live process holds it (info: its pid, host and what); `subject`
    begins the message about a file there that is not a lock."""

    def __init__(self, path: Path, what: str, busy, subject: str = "cannot lock"):
        self.path: Path | None = None
        self.fd: int | None = None
        line = f"{TAG} pid={os.getpid()} host={socket.gethostname()} what={what}\n".encode()
        for _ in range(20):
            fd = self._create(path, line)
            if fd is not None:
                self.path, self.fd = path, fd
                return
            fd = _open_existing(path, subject)
            if fd is None:
                continue  # released between our two attempts
            try:
                info = _read(fd)
                if info is None:
                    raise _foreign(path, subject)
                if not _try_flock(fd):
                    raise busy(_read(fd) or info)
                if not _names_fd(path, fd):
                    os.close(fd)
                    continue  # its holder removed it while we looked
            except BaseException:
                if fd is not None and self.fd is None:
                    os.close(fd)
                raise
            # a stale lock (its process is gone): ours now
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
            self.path, self.fd = path, fd
            return
        raise DidError(f"could not take the lock {path}")

    @staticmethod
    def _create(path: Path, line: bytes) -> int | None:
        """Make the lock whole under a temporary name, flocked, then link it into place; the
        descriptor, or None when something is already at `path`."""
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise DidError(f"cannot create the lock {path}: {reason(e)}") from None
        try:
            os.write(fd, line)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.fchmod(fd, 0o644)
            os.link(tmp, path)
            return fd
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            raise DidError(f"cannot create the lock {path}: {reason(e)}") from None
        finally:
            os.unlink(tmp)

    def release(self) -> None:
        """Remove the lock file (when it is still ours), then let go of the flock."""
        if self.fd is None:
            return
        if self.path is not None and _names_fd(self.path, self.fd):
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self.fd)
        self.fd = self.path = None


def holder(path: Path, subject: str = "cannot lock") -> dict | None:
    """The pid, host and what of the live process holding the lock at `path`; None when the
    lock is free or stale. DidError when the file there is not a lock of ours."""
    fd = _open_existing(path, subject)
    if fd is None:
        return None
    try:
        info = _read(fd)
        if info is None:
            raise _foreign(path, subject)
        if _try_flock(fd):
            return None  # stale: nobody holds it
        return info
    finally:
        os.close(fd)


def _busy_output(t: Target):
    def busy(info: dict) -> DidError:
        return DidError(
            f"cannot write {t.path}: another did process (pid {info['pid']}, {info['what']}) is writing "
            f"it (lock {lock_path(t)}); wait for it or choose another output"
        )

    return busy


def check_free(t: Target) -> None:
    """Raise DidError when a live process holds the lock of `t`, or a file that is not a lock
    sits at its name (before any work)."""
    if t.special:
        return
    info = holder(lock_path(t), f"cannot write {t.path}")
    if info is not None:
        raise _busy_output(t)(info)


def output_lock(t: Target, what: str) -> Lock | None:
    """The exclusive lock of one output target (none for devices and pipes)."""
    return None if t.special else Lock(lock_path(t), what, _busy_output(t), f"cannot write {t.path}")


# ------------------------------------------------------------------------------- run folders


def _has_checkpoint(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir())


def _clear(run: Path, keep: str) -> None:
    """Remove what a failed start wrote into `run` (everything but `keep`)."""
    for p in run.iterdir():
        if p.name == keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def remove_made(made: list[Path]) -> None:
    """Remove the (empty) folders a failed start made, deepest first; a folder something else
    has filled meanwhile stays."""
    for p in made:
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def hold_run_folder(out: str | Path, what: str, resume: bool = False) -> Iterator[None]:
    """Hold the lock of run folder `out` while a training command runs in it (main process
    only: RANK 0 or no launcher). A second process training the same folder, `--resume`
    included, is refused naming the holder. When the run fails before its first checkpoint in a
    folder that was new or empty, what it wrote is removed (and the folder, when it made it),
    so that the corrected command is not refused."""
    run = Path(out)
    if int(os.environ.get("RANK", "0") or 0) != 0 or (run.exists() and not run.is_dir()):
        yield  # other ranks follow rank 0; a file as --out is the trainer's to report
        return
    made = [p for p in (run, *run.parents) if not p.exists()]
    run.mkdir(parents=True, exist_ok=True)
    fresh = not resume and all(p.name == RUN_LOCK for p in run.iterdir())

    def busy(info: dict) -> DidError:
        return DidError(
            f"--out {run} is being trained by another did process (pid {info['pid']}, {info['what']}; "
            f"lock {run / RUN_LOCK}); wait for it, or choose another --out"
        )

    try:
        lock = Lock(run / RUN_LOCK, what, busy, f"--out {run}")
    except BaseException:
        remove_made(made)
        raise
    try:
        yield
    except BaseException:
        if fresh and not _has_checkpoint(run):
            _clear(run, RUN_LOCK)
            lock.release()
            remove_made(made)
        raise
    finally:
        lock.release()


__all__ = [
    "TAG",
    "RUN_LOCK",
    "Lock",
    "lock_path",
    "holder",
    "check_free",
    "output_lock",
    "hold_run_folder",
    "remove_made",
]
