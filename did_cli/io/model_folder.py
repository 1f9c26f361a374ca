"""Model folders: a model's config.json and its weights in model.safetensors, ours or a public
BD3-LM / MDLM one (`backbone.` tensor names). Loading is strict: a missing, unexpected or
mis-shaped tensor stops it with its name. `load_model` takes every path a command's --model
does (a checkpoint folder, a run folder, RUN/best, RUN/latest; see did_cli.io.checkpoint).

Both backbone families live in such folders: a config.json with `"family": "llama"` is an
adapted Llama-family model (read and written by did_cli.io.pretrained), one without is the DiT.
`read_config`, `load_model` and `save_model` dispatch on it, so every command takes either."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from did_cli import util
from did_cli.core.llama_config import FAMILY, LlamaConfig
from did_cli.core.model_config import ModelConfig
from did_cli.errors import DidError
from did_cli.io.bounded import read_json
from did_cli.io.checkpoint import resolve_checkpoint
from did_cli.io.outputs import unique_temporary
from did_cli.io.schemas import check_clip_tensors, check_model_config
from did_cli.util import atomic_write

if TYPE_CHECKING:
    from did_cli.core.dit import DiT
    from did_cli.core.llama import LlamaDiffusion


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
    extras = check_clip_tensors({k: tensors[k] for k in CLIP_KEYS if k in tensors}, source)
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


def read_config(folder: str | Path) -> ModelConfig | LlamaConfig:
    """The model config of a checkpoint folder (either family), checked: a missing key or a
    value of the wrong type is a DidError naming the file and the key."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DidError(f"{folder}: no config.json (not a checkpoint folder)")
    raw = read_json(path)  # bounded, checked JSON integers (did_cli.io.bounded)
    body = raw.get("model", raw) if isinstance(raw, dict) else raw
    if isinstance(body, dict) and "family" in body:
        return _llama_config(body, path)
    body = check_model_config(body, str(path))
    try:
        return ModelConfig.from_dict(body)
    except (ValueError, TypeError) as e:  # UsageError from the config's own checks: a fault of the file
        raise DidError(f"{path}: {util.first_line(e)}") from None


LLAMA_KEYS = ("vocab_size", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "model_length")


def _llama_config(body: dict, path: Path) -> LlamaConfig:
    if body["family"] != FAMILY:
        raise DidError(f"{path}: unknown model family {body['family']!r} (known: {FAMILY})")
    missing = [k for k in LLAMA_KEYS if k not in body]
    if missing:
        raise DidError(f"{path}: missing {', '.join(repr(k) for k in missing)} (a damaged or foreign config)")
    for key in LLAMA_KEYS + ("intermediate_size", "mask_id", "bos_id", "eos_id"):
        v = body.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key.endswith("_id") else 1):
            raise DidError(
                f"{path}: {key!r} must be {'an id' if key.endswith('_id') else 'a positive integer'}, "
                f"got {json.dumps(v)[:40]}"
            )
    try:
        return LlamaConfig.from_dict(body)
    except (ValueError, TypeError) as e:  # UsageError from the config's own checks: a fault of the file
        raise DidError(f"{path}: {util.first_line(e)}") from None


def load_model(
    path: str | Path, device: str | torch.device = "cpu", finite: bool = True
) -> tuple[DiT | LlamaDiffusion, dict[str, Any]]:
    """Load a model for use: `path` is what `resolve_checkpoint` takes (a checkpoint folder,
    ours or a public BD3-LM/MDLM one, a run folder, RUN/best or RUN/latest), of either family.
    Remote-code Python files in the folder are ignored. Returns the model in eval mode and an
    info dict (the checkpoint folder, the clip range when stored, the raw config). `device`: "auto"
    (CUDA when available), "cpu", "cuda:N" or a torch.device. `finite`:
    refuse weights holding NaN or inf (DidError naming the tensor); training turns it off, as
    it has its own non-finite guard."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from did_cli.core.dit import DiT

    device = util.resolve_device(device, "device")  # "auto" as the commands take it
    folder = resolve_checkpoint(path)
    cfg = read_config(folder)
    if isinstance(cfg, LlamaConfig):
        from did_cli.io.pretrained import load_llama

        if not (folder / "model.safetensors").is_file():
            raise DidError(f"{folder}: missing model.safetensors")
        return load_llama(folder, device=device, finite=finite)
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
    raw = read_json(folder / "config.json")
    info: dict[str, Any] = {"raw_config": raw, "folder": folder}
    if len(extras) == 2:
        info["clip"] = (extras["sampling_eps_min"], extras["sampling_eps_max"])
    return model, info


def save_model(
    model: DiT | LlamaDiffusion,
    folder: str | Path,
    extra_config: dict[str, Any] | None = None,
    clip: tuple[float, float] | None = None,
) -> None:
    """Write `config.json` + `model.safetensors` into `folder` (created). Each file is written to
    a temporary name and renamed, so a crash never leaves a half-written file under the real name.
    A Llama-family model is saved by `did_cli.io.pretrained.save_llama` (our tensor names; its
    clip range lives in config.json's `clip_ranges`, not as BD3-LM's scalar tensors)."""
    from safetensors.torch import save_file

    if isinstance(model.config, LlamaConfig):
        from did_cli.io.pretrained import save_llama

        save_llama(model, folder, extra_config)
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().cpu() for k, v in export_state_dict(model).items()}
    if clip is not None:
        tensors["sampling_eps_min"] = torch.tensor(float(clip[0]))
        tensors["sampling_eps_max"] = torch.tensor(float(clip[1]))
    tmp = unique_temporary(folder / "model.safetensors")  # never a fixed name a link could sit at
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
