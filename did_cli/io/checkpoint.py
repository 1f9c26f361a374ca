"""Checkpoint folders: the model's weights and config, and a training run's numbered checkpoints.

Model folder (ours, or a public BD3-LM / MDLM one)
    config.json              model config (BD3-LM keys), + block sizes and clip ranges of ours
    model.safetensors        tensors under BD3-LM's names (`backbone.` prefix), float32;
                             `sampling_eps_min/max` scalars hold the learned clip range
    Loading is strict: a missing, unexpected or mis-shaped tensor stops it with its name.

Run folder
    RUN/config.json          resolved TrainConfig ("train") and ModelConfig ("model")
    RUN/metrics.jsonl        one JSON object per log / eval event
    RUN/best.json            the checkpoint with the best validation NELBO (never pruned)
    RUN/checkpoints/step-00000100/
        config.json          model config (+ block sizes, clip ranges)
        model.safetensors    EMA weights: `did_cli.core.dit.load_model(folder)` loads them alone
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
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from did_cli import util
from did_cli.core.model_config import ModelConfig
from did_cli.errors import DidError
from did_cli.util import atomic_write, first_line, os_reason, save_json

if TYPE_CHECKING:
    from did_cli.core.dit import DiT

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
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write_files(tmp)
        write_manifest(tmp)
        _fsync_tree(tmp)
    except Exception as e:  # OSError, DidError or safetensors' own error type (e.g. a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, DidError)) and type(e).__name__ != "SafetensorError":
            raise
        raise DidError(f"cannot write checkpoint {root / name}: {os_reason(e)}") from None
    final = root / name
    if final.exists():
        # same step saved twice (e.g. a best checkpoint at the last step): move the old one aside
        old = root / f".old-{name}"
        if old.exists():
            shutil.rmtree(old)
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
    `deep=False` checks file sizes only (no hashing)."""
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        return "no manifest.json (incomplete write)"
    try:
        files = json.loads(man.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest.json"
    for rel, info in files.items():
        p = folder / rel
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
    p = Path(run_dir) / BEST
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


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
    for tmp in (run / CKPT_DIR).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return deleted


# ---------------------------------------------------------------------------------- model folders

PREFIX = "backbone."
CLIP_KEYS = ("sampling_eps_min", "sampling_eps_max")


def export_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """The model's tensors under BD3-LM's public names (with the `backbone.` prefix)."""
    return {PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()}


def load_state_dict_strict(
    model: DiT, tensors: dict[str, torch.Tensor], source: str = "checkpoint", finite: bool = False
) -> dict[str, float]:
    """Load BD3-LM-named tensors strictly: any missing, unexpected or mis-shaped tensor raises a
    DidError naming it. Returns extra scalars found (the learned clip range), e.g.
    {"sampling_eps_min": 0.45, "sampling_eps_max": 0.95}. `finite`: a tensor holding NaN or inf
    raises DidError naming it (and the first bad element)."""
    extras = {k: float(tensors[k].float().reshape(-1)[0]) for k in CLIP_KEYS if k in tensors}
    ours = {
        k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in tensors.items() if k not in CLIP_KEYS
    }
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing:
        raise DidError(
            f"{source}: missing tensor {PREFIX}{missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        raise DidError(
            f"{source}: unexpected tensor {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DidError(
                f"{source}: tensor {PREFIX}{k} has shape {list(v.shape)}, expected {list(expected[k].shape)}"
            )
        if not v.is_floating_point():
            raise DidError(
                f"{source}: tensor {PREFIX}{k} has dtype {v.dtype}, expected a floating-point dtype"
            )
        if finite:
            check_finite(v, f"{source}: tensor {PREFIX}{k}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in ours.items()}, strict=True)
    return extras


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise DidError when `t` holds NaN or inf, naming `what`, the count and the first index."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = [int(i) for i in torch.nonzero(bad)[0]]
        raise DidError(
            f"{what} holds {int(bad.sum())} non-finite value(s) (first at index {first}: "
            f"{float(t[tuple(first)])}); the weights are damaged"
        )


def read_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DidError(f"{folder}: no config.json (not a checkpoint folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DidError(f"{path}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise DidError(f"cannot read {path}: {util.first_line(e)}") from None
    body = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(body, dict):
        raise DidError(f"{path}: expected a JSON object of model settings, got a JSON {_json_type(body)}")
    missing = [k for k in CONFIG_KEYS if k not in body]
    if missing:
        raise DidError(f"{path}: missing {', '.join(repr(k) for k in missing)} (a damaged or foreign config)")
    for key, value in body.items():
        want = CONFIG_TYPES.get(key)
        if (
            want is not None
            and value is not None
            and not (isinstance(value, want) and not isinstance(value, bool))
        ):
            raise DidError(
                f"{path}: {key!r} must be {_WANT_NAMES.get(want, 'a ' + str(want))}, "
                f"got {_json_type(value)} {json.dumps(value)[:40]}"
            )
    for key in ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim", "model_length"):
        if body[key] < 1:
            raise DidError(f"{path}: {key!r} is {body[key]}, must be at least 1")
    try:
        return ModelConfig.from_dict(body)
    except (ValueError, TypeError) as e:  # UsageError from the config's own checks: a fault of the file
        raise DidError(f"{path}: {util.first_line(e)}") from None


CONFIG_KEYS = ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim", "model_length")
"""Keys a checkpoint's config.json must hold (BD3-LM's names); the others have defaults."""
CONFIG_TYPES: dict[str, type] = {
    **{k: int for k in CONFIG_KEYS},
    "mlp_ratio": int,
    "mask_id": int,
    "bos_id": int,
    "eos_id": int,
    "tokenizer": str,
    "dropout": (int, float),
}  # type: ignore[dict-item]
_WANT_NAMES = {int: "an integer", str: "a string", (int, float): "a number"}


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__
    )


def load_model(
    path: str | Path, device: str | torch.device = "cpu", finite: bool = True
) -> tuple[DiT, dict[str, Any]]:
    """Load a model for use: `path` is what `resolve_checkpoint` takes (a checkpoint folder,
    ours or a public BD3-LM/MDLM one, a run folder, RUN/best or RUN/latest). Remote-code Python
    files in the folder are ignored. Returns the model in eval mode and an info dict (the
    checkpoint folder, the clip range when stored, the raw config). `finite`: refuse weights
    holding NaN or inf (DidError naming the tensor); training turns it off, as it has its own
    non-finite guard."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from did_cli.core.dit import DiT

    folder = resolve_checkpoint(path)
    cfg = read_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise DidError(f"{folder}: missing model.safetensors")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise DidError(f"{weights}: unreadable safetensors file ({e})") from None
    model = DiT(cfg)
    extras = load_state_dict_strict(model, tensors, source=str(weights), finite=finite)
    model.to(device).eval()
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    info: dict[str, Any] = {"raw_config": raw, "folder": folder}
    if len(extras) == 2:
        info["clip"] = (extras["sampling_eps_min"], extras["sampling_eps_max"])
    return model, info


def save_model(
    model: DiT,
    folder: str | Path,
    extra_config: dict[str, Any] | None = None,
    clip: tuple[float, float] | None = None,
) -> None:
    """Write `config.json` + `model.safetensors` into `folder` (created). Each file is written to
    a temporary name and renamed, so a crash never leaves a half-written file under the real name."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().cpu() for k, v in export_state_dict(model).items()}
    if clip is not None:
        tensors["sampling_eps_min"] = torch.tensor(float(clip[0]))
        tensors["sampling_eps_max"] = torch.tensor(float(clip[1]))
    tmp = folder / "model.safetensors.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / "model.safetensors")
    except BaseException:  # e.g. a full disk: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise
    cfg = model.config.to_dict()
    cfg.update({"model_type": "did", "architectures": ["DiT"]})
    cfg.update(extra_config or {})
    atomic_write(folder / "config.json", json.dumps(cfg, indent=2) + "\n")
