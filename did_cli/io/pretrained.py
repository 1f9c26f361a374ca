"""Pretrained causal LMs as Llama-family diffusion models, and our own folders of that family.

    cfg, state = read_pretrained("path/to/folder")          # or a .gguf file, or a hub name
    model = load_pretrained("model.gguf", model_length=128)  # [MASK] appended when needed
    save_llama(model, "out/")                                # config.json + model.safetensors
    model, info = load_llama("out/")

A source is a Hugging Face folder (config.json + safetensors), a `.gguf` file, or a hub name,
which is looked up in the local cache first and fetched only when the hub is reachable. Nothing
runs remote code. Our folders hold `config.json` (the config with `"family": "llama"`) and
`model.safetensors` under our tensor names, float32; loading them is strict like the imports.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from did_cli.core.backbones import family_of
from did_cli.core.llama import LlamaDiffusion, append_mask_row
from did_cli.core.llama_config import FAMILY, LlamaConfig
from did_cli.errors import DidError, UsageError
from did_cli.io import bounded
from did_cli.io.gguf_import import read_gguf
from did_cli.io.hf_import import INDEX_FILE, read_hf_folder, read_json
from did_cli.util import atomic_write, first_line, hub_unreachable

HUB_FILES = [
    "config.json",
    "*.safetensors",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
"""What a hub snapshot fetches: the weights, their config and the tokenizer (no code)."""


def _looks_like_hub_name(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))


def hub_folder(name: str) -> Path:
    """A local snapshot of hub model `name`: the cache's, else downloaded when reachable."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or an incomplete cache): try the hub itself
        pass
    reason = hub_unreachable()
    if reason is not None:
        raise DidError(f"{name}: not a local file or folder, not in the hub cache, and {reason}")
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline mode, unknown or gated repository...
        raise DidError(
            f"{name}: not a local file or folder and the hub did not give it ({first_line(e)})"
        ) from None


def read_pretrained(source: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, float32 state dict in our names) of a source model, as it is: no [MASK] row yet
    (the config's mask_id is a placeholder), `tokenizer` set to the source."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        cfg, state = read_gguf(p)
        name = str(p.resolve())
    elif p.is_dir():
        cfg, state = read_hf_folder(p)
        name = str(p.resolve())
    elif not p.exists() and _looks_like_hub_name(str(source)):
        cfg, state = read_hf_folder(hub_folder(str(source)))
        name = str(source)
    else:
        raise UsageError(f"{source}: not a model folder, a .gguf file or a hub name")
    return dataclasses.replace(cfg, tokenizer=name), state


def load_pretrained(
    source: str | Path,
    model_length: int,
    shift: bool = True,
    mask_id: int | None = None,
    dropout: float = 0.0,
) -> LlamaDiffusion:
    """A diffusion model initialised from a pretrained causal LM (eval mode, float32).

    `mask_id` None appends a [MASK] row (`append_mask_row`); an id of the source's vocabulary
    that its tokenizer never produces may be given instead. `shift` True keeps the next-token
    shift, so at block size 1 the model is exactly the source."""
    if model_length < 1:
        raise UsageError(f"model length {model_length} must be at least 1")
    cfg, state = read_pretrained(source)
    if mask_id is None:
        cfg, state = append_mask_row(cfg, state)
    elif not 0 <= mask_id < cfg.vocab_size:
        raise UsageError(f"mask id {mask_id} is outside the vocabulary of {source} ({cfg.vocab_size} ids)")
    else:
        cfg = dataclasses.replace(cfg, mask_id=mask_id)
    cfg = dataclasses.replace(cfg, model_length=model_length, shift=shift, dropout=dropout)
    model = LlamaDiffusion(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------ our folders


def is_llama_folder(folder: str | Path) -> bool:
    """Whether a model folder's config.json (or a run's, under "model") is of this family."""
    path = Path(folder) / "config.json"
    try:
        raw = bounded.read_json(path)
    except (OSError, DidError):
        return False
    body = raw.get("model", raw) if isinstance(raw, dict) else None
    return isinstance(body, dict) and body.get("family") == FAMILY


def save_llama(model: LlamaDiffusion, folder: str | Path, extra_config: dict[str, Any] | None = None) -> None:
    """Write `config.json` (the config with its family key, plus `extra_config`) and
    `model.safetensors` (float32, our names) into `folder`, each through a temporary file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / "model.safetensors")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    cfg = model.config.to_dict()
    cfg.update({"model_type": "did", "architectures": ["LlamaDiffusion"]})
    cfg.update(extra_config or {})
    atomic_write(folder / "config.json", json.dumps(cfg, indent=2) + "\n")


def _check_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise DidError(f"{what} holds {int(bad.sum())} non-finite value(s); the weights are damaged")


def load_llama(
    folder: str | Path, device: str | torch.device = "cpu", finite: bool = True
) -> tuple[LlamaDiffusion, dict[str, Any]]:
    """Our model folder (`save_llama`) -> (model in eval mode, {"raw_config", "folder"}).
    Strict: a missing, unexpected, mis-shaped or non-float tensor raises DidError naming it;
    `finite` also refuses NaN or inf."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = read_json(folder / "config.json")
    body = raw.get("model", raw)
    try:
        if family_of(body) != FAMILY:
            raise DidError(f"{folder / 'config.json'}: not a {FAMILY}-family model")
        cfg = LlamaConfig.from_dict(body)
    except (TypeError, ValueError) as e:  # UsageError of the config's checks: a fault of the file
        raise DidError(f"{folder / 'config.json'}: {first_line(e)}") from None
    weights = folder / "model.safetensors"
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise DidError(f"{weights}: unreadable safetensors file ({first_line(e)})") from None
    model = LlamaDiffusion(cfg)
    expected = model.state_dict()
    for k in sorted(set(expected) | set(tensors)):
        if k not in tensors:
            raise DidError(f"{weights}: missing tensor {k}")
        if k not in expected:
            raise DidError(f"{weights}: unexpected tensor {k}")
        t = tensors[k]
        if tuple(t.shape) != tuple(expected[k].shape) or not t.is_floating_point():
            raise DidError(
                f"{weights}: tensor {k} is {t.dtype} {list(t.shape)}, expected floating point "
                f"{list(expected[k].shape)}"
            )
        if finite:
            _check_finite(t, f"{weights}: tensor {k}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.to(device).eval(), {"raw_config": raw, "folder": folder}
