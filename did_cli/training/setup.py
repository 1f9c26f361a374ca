"""What a training run starts from: the accelerator, the model (fresh, `--init`, or the run being
resumed), the optimiser and its schedule, the validation batches, and the checks that a resumed
run is the same run."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from did_cli.core.diffusion import check_resample
from did_cli.core.dit import DiT
from did_cli.core.model_config import JSON_KEYS, ModelConfig, preset
from did_cli.errors import DidError, UsageError
from did_cli.io.data import check_token_ids
from did_cli.io.model_folder import load_model
from did_cli.training import tracking  # noqa: E402
from did_cli.training.adapt import adapted_model
from did_cli.training.adapt_config import AdaptConfig
from did_cli.training.init_source import fetch_init, init_clip_ranges, init_data_start
from did_cli.training.state import step_seed
from did_cli.training.train_config import FULL_RANGE, SIZE_FLAGS, TrainConfig, model_overrides
from did_cli.util import atomic_write, first_line, warn

# fields that must match when resuming (they define the data order, noise and model)
RESUME_FIELDS = ("batch_size", "grad_accum", "seed", "lr", "warmup", "weight_decay", "betas", "ema")


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # repeated in-process runs (tests, notebooks) may change settings: start from a clean state,
    # keeping the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    mp = cfg.mixed_precision
    if mp in (None, "auto"):
        mp = "bf16" if torch.cuda.is_available() else "no"
    # Accelerate only sets up a CPU process group (gloo) when told to use the CPU; a launcher's
    # environment (torchrun / `accelerate launch --multi_gpu`) on a machine without CUDA means that
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        return Accelerator(
            mixed_precision=mp,
            gradient_accumulation_steps=cfg.grad_accum,
            cpu=cpu,
            **tracking.accelerator_kwargs(cfg.log_with, Path(cfg.out)),
        )
    except (RuntimeError, ValueError) as e:  # e.g. an FSDP config on a machine without GPUs
        raise DidError(
            f"accelerate could not set up this run ({first_line(e)}); check the accelerate config "
            "(FSDP needs GPUs; on a CPU use plain or --multi_gpu launches)"
        ) from None


def with_dropout(model: DiT, dropout: float | None) -> DiT:
    if dropout is None:
        return model
    model.config = dataclasses.replace(model.config, dropout=dropout)
    for blk in model.blocks:
        blk.dropout = dropout
    return model


def build_model(
    cfg: TrainConfig, data: Any, run: Path, resume_ckpt: Path | None, accel: Any
) -> tuple[DiT, dict[int, tuple[float, float]], dict[str, Any]]:
    """The model to train: the resumed run's config, the --init weights, the pretrained source
    of `did adapt`, or a fresh preset. Returns (model, clip ranges stored with --init, init info
    recorded in the run)."""
    if resume_ckpt is not None:
        model, _ = load_model(resume_ckpt, finite=False)  # config; the trainer loads the raw weights over it
        return with_dropout(model, cfg.dropout), {}, {}
    if isinstance(cfg, AdaptConfig):
        with accel.main_process_first():  # a hub source downloads once
            model = adapted_model(cfg, data)
        return model, {}, {"adapted_from": cfg.source}
    if cfg.init:
        with accel.main_process_first():
            folder = fetch_init(cfg.init)
        model, info = load_model(folder, finite=False)  # non-finite weights: the loss guard reports them
        clip_from_init = init_clip_ranges(info["raw_config"], info.get("clip"))
        init_info = {
            "init": str(folder),
            "init_clip": list(info["clip"]) if "clip" in info else None,
            "data_start": init_data_start(folder, data.meta, cfg.seed),
        }
        return with_dropout(model, cfg.dropout), clip_from_init, init_info
    mc = preset(
        cfg.preset,
        model_length=data.seq_len,
        vocab_size=data.vocab_size,
        dropout=cfg.dropout,
        **model_overrides(cfg),
        tokenizer=data.meta["tokenizer"],
        mask_id=data.meta.get("mask_id", data.vocab_size - 1),
        bos_id=data.meta.get("bos_id"),
        eos_id=data.meta.get("eos_id"),
    )
    torch.manual_seed(step_seed(cfg.seed, 0, 0, 0, 7))  # same initial weights on every rank
    return DiT(mc), {}, {}


def check_model_fits_data(mc: ModelConfig, data: Any) -> None:
    data.check_compatible(tokenizer=mc.tokenizer, vocab_size=mc.vocab_size, seq_len=mc.model_length)
    check_token_ids(data, mc.vocab_size)
    if "mask_id" in data.meta and int(data.meta["mask_id"]) != mc.mask_id:
        raise DidError(
            f"data in {data.path} uses [MASK] id {data.meta['mask_id']} but the model uses {mc.mask_id}"
        )


def make_optimizer(model: DiT, cfg: TrainConfig, device: torch.device):
    """AdamW (fused where the device has the kernel) with linear warm-up, then constant."""
    # fused AdamW: one kernel over all tensors (also on CPU, where the update of the two
    # 50258-row embeddings is a large share of a small model's step)
    fused = device.type in ("cuda", "cpu")
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), fused=fused or None, **kw)
    except (RuntimeError, TypeError):  # a torch without the fused kernel for this device
        optimizer = torch.optim.AdamW(model.parameters(), **kw)
    warm = cfg.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
    )
    return optimizer, scheduler


def compile_model(model: DiT, wanted: bool | None) -> bool:
    """torch.compile the model's transformer blocks in place (`DiT.compile_blocks`) when
    `wanted` (None: on CUDA); returns whether it did. One graph per (shape, grad mode), built at
    the first step of each: the 2L pass of every block size < L shares one, the 1L pass of
    block L has its own. On a CPU inductor needs a C++ compiler and takes a minute or more per
    graph, so it warns there."""
    device = next(model.parameters()).device
    if wanted is None:
        wanted = device.type == "cuda"
    if not wanted:
        return False
    if device.type != "cuda":
        warn(
            f"--compile on {device.type}: the first step of each pass compiles for a minute or more (it "
            "pays on CUDA)"
        )
    model.compile_blocks()
    return True


def clip_ranges(
    cfg: TrainConfig, sizes: list[int], length: int, from_init: dict[int, tuple[float, float]]
) -> tuple[dict[int, tuple[float, float]], list[int]]:
    """The t range each block size starts with (--clip, or the --init folder's, or the full
    range) and the block sizes --clip auto searches: all but the global block L, which BD3-LM
    never clips, unless `clip_global`."""
    if cfg.clip is None or cfg.clip == "auto":
        ranges = {b: from_init.get(b, FULL_RANGE) for b in sizes}
    else:
        ranges = {b: (float(cfg.clip[0]), float(cfg.clip[1])) for b in sizes}
    if cfg.resample:
        for b, r in ranges.items():
            check_resample(b, r)
    searched = [b for b in sizes if b < length or cfg.clip_global] if cfg.clip == "auto" else []
    return ranges, searched


def _spread_batches(val_rows: np.ndarray, n_rows: int, size: int, device: torch.device) -> list[torch.Tensor]:
    """`n_rows` rows evenly spread over the split, in batches of `size`."""
    n_val = min(len(val_rows), n_rows)
    idx = (
        np.unique(np.linspace(0, len(val_rows) - 1, n_val).round().astype(np.int64))
        if n_val
        else np.empty(0, np.int64)
    )
    return [
        torch.from_numpy(np.asarray(val_rows[idx[i : i + size]], dtype=np.int64)).to(device)
        for i in range(0, len(idx), size)
    ]


def validation_batches(val_rows: np.ndarray, cfg: TrainConfig, device: torch.device) -> list[torch.Tensor]:
    """Fixed rows evenly spread over the split, in batches of --batch-size."""
    return _spread_batches(val_rows, cfg.eval_batches * cfg.batch_size, cfg.batch_size, device)


def clip_search_batches(val_rows: np.ndarray, cfg: TrainConfig, device: torch.device) -> list[torch.Tensor]:
    """The rows --clip auto scores candidates on: up to --clip-batches batches of --batch-size
    rows (at least 2: the statistic is a variance within a batch), evenly spread."""
    size = max(2, cfg.batch_size)
    batches = _spread_batches(val_rows, cfg.clip_batches * size, size, device)
    return [x for x in batches if len(x) > 1] or batches


def check_resume(cfg: TrainConfig, saved: dict, sizes: list[int], weights: list[float], world: int) -> None:
    old = saved.get("train", {})
    adapt = ("source", "shift") if isinstance(cfg, AdaptConfig) else ()
    for name in RESUME_FIELDS + adapt:
        a, b = getattr(cfg, name), old.get(name)
        if isinstance(a, tuple):
            a = list(a)
        if b is not None and a != b:
            flag = {"source": "from", "shift": "shift/--no-shift"}.get(name, name.replace("_", "-"))
            raise UsageError(f"--resume: --{flag} {a} differs from the run's {b}")
    model = saved.get("model", {})
    for opt, name in SIZE_FLAGS.items():  # a resumed run keeps its checkpoint's size
        want, key = getattr(cfg, opt), JSON_KEYS.get(name, name)
        if want is not None and model.get(key, want) != want:
            raise UsageError(
                f"--resume: --{opt.replace('_', '-')} {want} differs from the run's {model[key]}"
            )
    if saved.get("block_sizes") != sizes:
        raise UsageError(
            f"--resume: --block-sizes {','.join(map(str, sizes))} differs from the run's "
            f"{','.join(map(str, saved.get('block_sizes', [])))}"
        )
    if not np.allclose(saved.get("block_weights", weights), weights):
        raise UsageError(f"--resume: --block-weights differ from the run's {saved.get('block_weights')}")
    if saved.get("world_size", world) != world:
        print(
            f"did: warning: resuming with {world} processes instead of {saved['world_size']}: "
            "the data order changes from here on",
            file=sys.stderr,
        )


def run_config(
    cfg: TrainConfig,
    model: dict,
    sizes: list[int],
    weights: list[float],
    world: int,
    global_batch: int,
    data_meta: dict,
    compiled: bool,
    init_info: dict,
) -> dict:
    """What RUN/config.json holds: the settings (`train`), the resolved command-line options
    (`options`: the file is a valid --config), the model, the block mix and the data."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "options"}
    out = {
        "train": train,
        "model": model,
        "block_sizes": sizes,
        "block_weights": weights,
        "world_size": world,
        "global_batch": global_batch,
        "data": data_meta,
        "compiled": compiled,
        **init_info,
    }
    if cfg.options is not None:
        out["options"] = cfg.options
    return out


def check_warmup(cfg: TrainConfig) -> None:
    """A warm-up longer than the run never reaches the peak learning rate: say so."""
    if cfg.warmup > cfg.steps:
        warn(
            f"--warmup {cfg.warmup} is longer than the run's {cfg.steps} steps: the learning rate stops at "
            f"{cfg.lr * cfg.steps / cfg.warmup:.3g}, not --lr {cfg.lr:g}; scale --warmup with --steps "
            f"(e.g. --warmup {max(1, cfg.steps // 10)})"
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop events logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    atomic_write(path, "".join(x + "\n" for x in keep))


def broadcast(accel, obj):
    """`obj` as rank 0 has it, on every rank."""
    if accel.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]
