"""A training run's folder and its numbered checkpoints (a model folder alone, config.json +
model.safetensors, is did_cli.io.model_folder).

Run folder
    RUN/config.json          resolved TrainConfig ("train") and ModelConfig ("model")
    RUN/metrics.jsonl        one JSON object per log / eval event
    RUN/best.json            the checkpoint with the best validation NELBO (never pruned)
    RUN/checkpoints/step-00000100/
        config.json          model config (+ block sizes, clip ranges)
        model.safetensors    EMA weights: `did_cli.io.model_folder.load_model(folder)`
        train_state/
            raw_model.safetensors   the optimised (non-EMA) weights
            optimizer.pt, scheduler.pt, rng.pt   torch.save; read with weights_only=True
            state.json        step, data position, block-size sampler, best, clip ranges
        manifest.json        size + sha256 of every other file, written last

A checkpoint is written under `checkpoints/.tmp-step-...` and renamed into place; it counts as
complete only when its manifest exists and every file matches it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from did_cli import util
from did_cli.errors import DidError
from did_cli.io.bounded import read_json
from did_cli.io.schemas import check_best, check_manifest
from did_cli.io.targets import folder_mode
from did_cli.util import first_line, os_reason, save_json

CKPT_DIR = "checkpoints"
STATE_DIR = "train_state"
MANIFEST = "manifest.json"
BEST = "best.json"
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: str | Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------ writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_tree(folder: Path) -> None:
    for p in _files(folder):
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def write_manifest(folder: Path) -> None:
    entries = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    save_json({"format": "did.checkpoint/1", "files": entries}, folder / MANIFEST)


def save_checkpoint(run_dir: str | Path, step: int, write_files: Callable[[Path], None]) -> Path:
    """Create `RUN/checkpoints/step-XXXXXXXX` atomically.

    `write_files(tmp_folder)` writes everything except the manifest; the manifest is written
    last, the files are synced, and the folder is renamed into place (replacing an older folder of
    the same step)."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = None
    try:
        # a folder of its own (mkdtemp: a unique name, made exclusively); leftovers go at pruning
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
        os.chmod(tmp, folder_mode())
        write_files(tmp)
        write_manifest(tmp)
        _fsync_tree(tmp)
    except Exception as e:  # OSError, DidError or safetensors' own error type (e.g. a full disk)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, DidError)) and type(e).__name__ != "SafetensorError":
            raise
        raise DidError(f"cannot write checkpoint {root / name}: {os_reason(e)}") from None
    final = root / name
    if final.exists():
        # same step saved twice (e.g. a best checkpoint at the last step): move the old one aside
        old = root / f".old-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


def torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, str(path))


def torch_load(path: str | Path) -> Any:
    """Load training state saved by `torch_save`; weights_only: tensors and plain containers."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DidError(f"{path}: missing") from None
    except Exception as e:  # unpickling errors name the offending type; keep one line
        raise DidError(f"{path}: cannot read training state ({first_line(e)})") from None


# ------------------------------------------------------------------------------- verification


def verify_checkpoint(folder: str | Path, deep: bool = True) -> str | None:
    """None when the checkpoint matches its manifest; otherwise the reason it does not.
    `deep=False` checks file sizes only (no hashing). The manifest is read within a size limit
    and checked field by field; a path that leaves the folder (`../../etc/shadow`) makes it
    damaged before anything is looked at."""
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        return "no manifest.json (incomplete write)"
    try:
        files = check_manifest(read_json(man), "manifest.json")["files"]
    except DidError as e:
        return str(e)
    inside = os.path.realpath(folder)
    for rel, info in files.items():
        p = folder / rel
        if os.path.commonpath([inside, os.path.realpath(p)]) != inside:
            return f"manifest.json: {rel!r} leads out of the checkpoint folder"
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, manifest says {info['bytes']}"
        if deep and _sha256(p) != info["sha256"]:
            return f"{rel} does not match its sha256"
    if "model.safetensors" not in files:
        return "no model.safetensors"
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run (complete or not), oldest first; temporary folders excluded."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found)]


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CKPT_DIR).is_dir()


def latest_checkpoint(run_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint of a run; damaged newer ones are skipped (with a warning)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        reason = verify_checkpoint(ckpt)
        if reason is None:
            return ckpt
        if warn:
            util.warn(f"skipping damaged checkpoint {ckpt}: {reason}")
    return None


def read_best(run_dir: str | Path) -> dict | None:
    """best.json of a run (None when there is none); DidError naming it when it is damaged."""
    p = Path(run_dir) / BEST
    if not p.is_file():
        return None
    return check_best(read_json(p), str(p))


def write_best(run_dir: str | Path, checkpoint: Path, info: dict) -> None:
    save_json({"checkpoint": Path(checkpoint).name, **info}, Path(run_dir) / BEST)


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint folder from a user's path.

    - a folder with `model.safetensors` is itself (ours, or a public BD3-LM/MDLM folder);
    - a run folder gives its latest complete checkpoint (`which="best"`: the one named in
      best.json), skipping damaged ones with a warning on stderr;
    - `RUN/best` and `RUN/latest` name those of run RUN.
    Anything else raises DidError("no checkpoint in PATH")."""
    p = Path(path)
    if p.name in ("best", "latest") and not p.exists() and is_run_dir(p.parent):
        return resolve_checkpoint(p.parent, which=p.name)
    if (p / "model.safetensors").is_file() and not is_run_dir(p):
        if (p / MANIFEST).is_file():
            reason = verify_checkpoint(p)
            if reason is not None:
                raise DidError(f"checkpoint {p} is damaged: {reason}")
        return p
    if is_run_dir(p):
        if which == "best":
            best = read_best(p)
            if best:
                cand = p / CKPT_DIR / str(best.get("checkpoint", ""))
                reason = verify_checkpoint(cand) if cand.is_dir() else "missing"
                if reason is None:
                    return cand
                util.warn(f"best checkpoint {cand} unusable ({reason}); using the latest")
        found = latest_checkpoint(p)
        if found is not None:
            return found
    raise DidError(f"no checkpoint in {p}")


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, never the best one; stale
    temporary folders go too. Returns the deleted folders."""
    run = Path(run_dir)
    best = read_best(run)
    protect = {best.get("checkpoint")} if best else set()
    ckpts = list_checkpoints(run)
    complete = [c for c in ckpts if verify_checkpoint(c, deep=False) is None]
    keep = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    deleted = []
    for c in ckpts:
        if c in keep or c.name in protect:
            continue
        if c not in complete and complete and step_of(c) > step_of(complete[-1]):
            continue  # a damaged newest one stays for inspection
        shutil.rmtree(c, ignore_errors=True)
        deleted.append(c)
    for tmp in [*(run / CKPT_DIR).glob(".tmp-*"), *(run / CKPT_DIR).glob(".old-*")]:
        shutil.rmtree(tmp, ignore_errors=True)
    return deleted
