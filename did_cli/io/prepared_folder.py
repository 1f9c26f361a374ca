"""The output folder of `did prepare`: locked while a preparation runs, rebuilt in a staging
folder and swapped in only when complete, and recognised when a killed run left it half done.

- `hold(out)`: the folder's lock (`OUT/.did.lock`, did_cli.io.locks) for the whole preparation,
  so that a second `did prepare --out OUT` is refused instead of mixing files; the leftovers of
  a killed run are removed first (the lock says nobody else is working there).
- `write(out, rows, meta)`: every file is written and synced under `OUT/.did-prepare-XXXX/`;
  nothing in OUT changes until all of them are complete. Then the old meta.json is removed (a
  folder without one is never read as prepared data), the new .bin files are renamed in, and
  the new meta.json last. A full disk or any failure while building leaves OUT as it was.
- Leftovers of a killed run: staging folders `.did-prepare-*`, the temporary files our writer
  names `.train.bin.XXXX.tmp` (also `validation.bin`, `meta.json`), and `train.bin` /
  `validation.bin` without a meta.json when one of those is beside them (a bare `train.bin`
  with no such trace is the user's own, and refused as before).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from did_cli.errors import DidError
from did_cli.io.data import SPLITS, PreparedData
from did_cli.io.locks import RUN_LOCK, Lock, remove_made
from did_cli.io.outputs import describe_folder, is_empty_folder, target
from did_cli.io.targets import folder_mode, reason, write_bytes

STAGE = ".did-prepare-"
FILES = (*(f"{s}.bin" for s in SPLITS), "meta.json")
_TEMP = re.compile(r"^\.(train\.bin|validation\.bin|meta\.json)\..+\.tmp$")


def leftovers(out: Path) -> list[str]:
    """Names in `out` that a killed `did prepare` left (see the module docstring)."""
    try:
        names = set(os.listdir(out))
    except OSError:
        return []
    traces = sorted(n for n in names if n.startswith(STAGE) or _TEMP.match(n))
    if traces and "meta.json" not in names:
        traces += [n for n in FILES[:-1] if n in names and (out / n).is_file() and not (out / n).is_symlink()]
    return traces


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(out: Path) -> Iterator[list[str]]:
    """Lock `out` (created when missing) for one preparation and clean a killed run's leftovers;
    yields their names. A folder this call made is removed again when the preparation fails."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DidError(f"--out {out}: cannot create the folder ({reason(e)})") from None

    def busy(info: dict) -> DidError:
        return DidError(
            f"--out {out} is being written by another did process (pid {info['pid']}, {info['what']}); "
            "wait for it, or choose another --out"
        )

    lock = Lock(out / RUN_LOCK, "did prepare", busy, f"--out {out}")
    try:
        cleaned = leftovers(out)
        for name in cleaned:
            _remove(out / name)
        yield cleaned
    except BaseException:
        lock.release()
        remove_made(made)
        raise
    finally:
        lock.release()


def reusable(out: Path, content_hash: str) -> dict | None:
    """The meta of prepared data in `out` made from the same sources and settings, if complete."""
    try:
        data = PreparedData(out)
    except DidError:
        return None
    if data.meta.get("content_hash") != content_hash:
        return None
    try:
        for name in SPLITS:
            data.rows(name)  # checks the file sizes
    except DidError:
        return None
    return data.meta


def refuse_other(out: Path, mine: dict) -> None:
    """A non-empty --out that is not this preparation is not replaced without --force. The
    same sources and settings whose bytes changed are this preparation, refreshed. Names a
    rebuild would replace must be files (a folder named validation.bin stops it here, before
    the work)."""
    for name in FILES:
        target(out / name)
    if not out.is_dir() or is_empty_folder(out):
        return
    try:
        m = PreparedData(out).meta
        if all(m.get(k, "bos" if k == "row_layout" else None) == v for k, v in mine.items()):
            return
        what = (
            f"prepared data of other sources or settings (seq_len {m['seq_len']}, tokenizer "
            f"{m['tokenizer']!r}, {m['splits'].get('train', {}).get('rows', '?')} train rows)"
        )
    except DidError:
        what = f"files that are not this preparation ({describe_folder(out)})"
    raise DidError(f"--out {out} already holds {what}; pass --force to replace them, or choose another --out")


def write(out: Path, rows: dict, meta: dict) -> None:
    """Build the files in a staging folder, then swap them into `out` (module docstring)."""
    for name in FILES:
        target(out / name)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGE))
    try:
        os.chmod(stage, folder_mode())
        for name in SPLITS:
            _build(stage, out, f"{name}.bin", np.ascontiguousarray(rows[name]).reshape(-1).view(np.uint8))
        _build(stage, out, "meta.json", json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # OUT is as it was
        raise
    try:
        (out / "meta.json").unlink(missing_ok=True)  # from here the folder is incomplete
        for name in FILES:
            os.replace(stage / name, target(out / name).real)
        _sync(out)
    except OSError as e:  # the staging folder stays: the next run knows the folder for a leftover
        raise DidError(f"cannot write {out}: {reason(e)}") from None
    shutil.rmtree(stage, ignore_errors=True)


def _build(stage: Path, out: Path, name: str, data) -> None:
    """One file, synced, in the staging folder; its error names the file the user asked for."""
    try:
        write_bytes(stage / name, data, fsync=True)
    except DidError as e:
        raise DidError(str(e).replace(str(stage / name), str(out / name))) from None


def _sync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["STAGE", "hold", "leftovers", "reusable", "refuse_other", "write"]
