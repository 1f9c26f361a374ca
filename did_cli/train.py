"""One training loop for `did train` and `did finetune-mixscale`.

    from did_cli.train import TrainConfig, train
    train(TrainConfig(data="data/", out="run/", block_sizes=[4, "L"], block_weights=[0.9, 0.1]))

Choices worth knowing (docs/train.md has the long form):

- Block-size sampler: each optimisation step draws ONE block size from `block_weights` with a
  seeded generator that every process advances identically. Per step, not per sequence: every
  sequence of a step then shares one attention mask, so the pass is a single kernel call with a
  cached mask, and all data-parallel ranks run the same shapes.
- Determinism: data order, masking noise and dropout depend only on (seed, step, process), so a
  resumed run continues bit-for-bit (on the same hardware and process count). Rows and masking
  noise belong to the global batch, so N processes with batch b see what one process with batch
  N x b sees (dropout masks aside).
- EMA weights (decay warmed up as min(ema, (1+n)/(10+n)), as BD3-LM's EMA) are what
  validation uses and what `model.safetensors` holds.
- Validation NELBO is measured at every configured block size with a fixed-seed t, so values
  are comparable across evaluations; the best checkpoint is chosen by their mean.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from did_cli import checkpoint as ck
from did_cli.config import ConfigError, DiffusionConfig, ModelConfig, check_block_sizes, preset, save_json
from did_cli.errors import DidError
from did_cli.init_checkpoint import fetch_init, init_clip_ranges, init_data_start
from did_cli.train_console import Interrupt, TrainProgress, fmt_rate
from did_cli.train_state import EMA, BlockSizeSampler, RowSchedule, rng_state, set_rng_state, step_seed  # noqa: F401
from did_cli.validation import search_clip, val_nelbo  # noqa: F401 (val_nelbo: also imported from here)

FULL_RANGE = (0.0, 1.0)
LENGTH_WORDS = ("L", "l", "length")

BlockSize = Union[int, str]


@dataclass
class TrainConfig:
    """Everything one training run needs; the CLI builds it from options."""

    data: str = ""
    """Prepared data folder (`did prepare`)."""
    out: str = ""
    """Run folder: config.json, metrics.jsonl, checkpoints/."""
    preset: str = "tiny"
    """Model preset when training from scratch: tiny, quick, small, medium."""
    block_sizes: list[BlockSize] = field(default_factory=lambda: [4, "L"])
    """Block sizes to train on; 'L' (or 'length') is the full sequence length."""
    block_weights: list[float] | None = field(default_factory=lambda: [0.9, 0.1])
    """Probability of each block size per step (normalised); None = equal weights."""
    steps: int = 1000
    """Total optimiser steps (a resumed run continues up to this number)."""
    batch_size: int = 16
    """Sequences per process per micro-batch (global batch = batch_size x grad_accum x processes)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    lr: float = 3e-4
    """Peak AdamW learning rate (constant after warm-up)."""
    warmup: int = 2500
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    ema: float = 0.9999
    """EMA decay of the weights that are evaluated and saved (0 = no averaging)."""
    eval_every: int = 500
    """Validation every N steps (0 = only at the end)."""
    eval_batches: int = 8
    """Validation batches (of batch_size rows) per evaluation and block size."""
    save_every: int = 1000
    """Checkpoint every N steps (also at the end, on a new best, and on Ctrl-C)."""
    keep_last: int = 3
    """Checkpoints kept besides the best one (older ones are deleted)."""
    log_every: int = 10
    """Progress and metrics line every N steps."""
    seed: int = 0
    """Seed of data order, noise, dropout and the block-size sampler."""
    resume: bool = False
    """Continue from the latest complete checkpoint in `out`."""
    init: str | None = None
    """Start weights: a checkpoint or run folder (ours or BD3-LM's), or a hub id when online."""
    clip: Any = None
    """t range: (beta, omega), 'auto' (variance search per block size at each evaluation), or
    None ((0, 1), or the learned range stored with --init for its block size)."""
    mixed_precision: str | None = None
    """'no', 'bf16' or 'fp16'; None = bf16 on CUDA, else no."""
    dropout: float | None = None
    """Override the model's residual dropout."""
    model_length: int | None = None
    """Sequence length L; must equal the data's seq_len (None: taken from the data)."""
    num_workers: int = 0
    """Background threads that prefetch the next batches from the memory-mapped rows."""
    on_nonfinite: str = "stop"
    """Non-finite loss: 'stop' (error, the last good checkpoint stays) or 'skip' the step."""
    progress: bool = True
    """Progress on stderr (a bar on a terminal, plain lines otherwise)."""
    compile: bool = False
    """torch.compile the transformer blocks (the first step of each block size compiles; pays on CUDA)."""
    time_limit: float | None = None
    """Stop after this many seconds of training (evaluating and saving as at the last step)."""


# ---------------------------------------------------------------------------------- validation


def resolve_block_sizes(sizes: list[BlockSize], length: int) -> list[int]:
    out = []
    for b in sizes:
        if isinstance(b, str):
            if b.strip() in LENGTH_WORDS:
                out.append(length)
                continue
            try:
                b = int(b)
            except ValueError:
                raise ConfigError(f"--block-sizes: {b!r} is not an integer or 'L'") from None
        out.append(int(b))
    if not out:
        raise ConfigError("--block-sizes: empty list")
    check_block_sizes(out, length, "--block-sizes")
    if len(set(out)) != len(out):
        raise ConfigError(f"--block-sizes {','.join(map(str, out))}: a block size appears twice")
    return out


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"--block-weights has {len(w)} values for {n} --block-sizes")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ConfigError(f"--block-weights {','.join(map(str, w))}: weights must be finite and >= 0")
    total = sum(w)
    if total <= 0:
        raise ConfigError("--block-weights: the weights sum to 0")
    return [x / total for x in w]


def _check_config(cfg: TrainConfig) -> None:
    positive = dict(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, eval_batches=cfg.eval_batches,
                    log_every=cfg.log_every)
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    for name in ("warmup", "eval_every", "save_every", "keep_last", "num_workers"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 0")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr {cfg.lr}: must be > 0")
    if not 0.0 <= cfg.ema < 1.0:
        raise ConfigError(f"--ema {cfg.ema}: must be in [0, 1)")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"--on-nonfinite {cfg.on_nonfinite!r}: choose stop or skip")
    if cfg.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ConfigError(f"--mixed-precision {cfg.mixed_precision!r}: choose no, bf16 or fp16")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if isinstance(cfg.clip, str) and cfg.clip != "auto":
        raise ConfigError(f"--clip {cfg.clip!r}: expected auto, none or BETA,OMEGA")
    if cfg.clip is not None and not isinstance(cfg.clip, str):
        DiffusionConfig(clip=tuple(cfg.clip))  # raises ConfigError on a bad range
    if cfg.clip == "auto" and cfg.eval_batches < 2:
        raise ConfigError("--clip auto needs --eval-batches >= 2 (it compares loss variances across batches)")
    if not cfg.data:
        raise ConfigError("--data is required")
    if not cfg.out:
        raise ConfigError("--out is required")


# ---------------------------------------------------------------------------------- compile


def compile_model(model) -> None:
    """torch.compile the model's transformer blocks in place (`DiT.compile_blocks`): one graph
    per block size, built at its first step. On a CPU inductor needs a C++ compiler and takes
    a minute or more per graph, so it warns there."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        print(f"did: warning: --compile on {device.type}: the first step of each block size compiles for a "
              "minute or more (it pays on CUDA)", file=sys.stderr)
    model.compile_blocks()


# ------------------------------------------------------------------------------------ the loss


def sharded_nelbo(model, x0: torch.Tensor, block_size: int, dcfg: DiffusionConfig, mask_id: int,
                  generator: torch.Generator, world: int = 1, rank: int = 0) -> torch.Tensor:
    """The training loss of this process's rows: diffusion.nelbo with the global batch's noise."""
    from did_cli.diffusion import nelbo

    return nelbo(model, x0, block_size, dcfg, mask_id, generator, world=world, rank=rank).loss


def _with_dropout(model, dropout: float | None):
    if dropout is None:
        return model
    model.config = dataclasses.replace(model.config, dropout=dropout)
    for blk in model.blocks:
        blk.dropout = dropout
    return model


# ---------------------------------------------------------------------------------------- train


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # repeated in-process runs (tests, notebooks) may change settings: start from a clean state,
    # keeping the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    mp = cfg.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    # Accelerate only sets up a CPU process group (gloo) when told to use the CPU; a launcher's
    # environment (torchrun / `accelerate launch --multi_gpu`) on a machine without CUDA means that
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        return Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu)
    except (RuntimeError, ValueError) as e:  # e.g. an FSDP config on a machine without GPUs
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DidError(f"accelerate could not set up this run ({msg}); check the accelerate config "
                       "(FSDP needs GPUs; on a CPU use plain or --multi_gpu launches)") from None


# fields that must match when resuming (they define the data order, noise and model)
_RESUME_FIELDS = ("batch_size", "grad_accum", "seed", "lr", "warmup", "weight_decay", "betas", "ema")


def train(cfg: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) and return the final metrics."""
    from did_cli.data import PreparedData
    from did_cli.model import DiT, load_model, load_state_dict_strict, save_model

    _check_config(cfg)
    if not Path(cfg.data).exists():
        raise DidError(f"--data {cfg.data}: no such folder")
    data = PreparedData(cfg.data)
    length = data.seq_len
    if cfg.model_length is not None and cfg.model_length != length:
        raise DidError(f"--model-length {cfg.model_length} differs from the data's seq_len {length} in {cfg.data}")
    sizes = resolve_block_sizes(list(cfg.block_sizes), length)
    weights = normalise_weights(cfg.block_weights, len(sizes))
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise DidError(f"--out {run}: exists and is not a folder")

    resume_ckpt: Path | None = None
    if cfg.resume:
        resume_ckpt = ck.latest_checkpoint(run)
        if resume_ckpt is None:
            raise DidError(f"--resume: no complete checkpoint in {run}")
    elif ck.list_checkpoints(run):
        raise DidError(f"{run} already holds checkpoints; pass --resume to continue it or choose another --out")

    accel = _make_accelerator(cfg)
    device, rank, world, main = accel.device, accel.process_index, accel.num_processes, accel.is_main_process

    # ---- model config and weights
    init_info: dict[str, Any] = {}
    clip_from_init: dict[int, tuple[float, float]] = {}
    if resume_ckpt is not None:
        saved = json.loads((run / "config.json").read_text())
        sm = saved.get("model", {})  # data from another tokenizer / length: say so, not "--block-sizes differ"
        data.check_compatible(tokenizer=sm.get("tokenizer", "gpt2"), vocab_size=sm.get("vocab_size", data.vocab_size),
                              seq_len=sm.get("model_length"))
        _check_resume(cfg, saved, sizes, weights, world)
        model, _ = load_model(resume_ckpt)  # config; weights replaced by the raw ones below
        model = _with_dropout(model, cfg.dropout)
    elif cfg.init:
        with accel.main_process_first():
            folder = fetch_init(cfg.init)
        model, info = load_model(folder)
        model = _with_dropout(model, cfg.dropout)
        clip_from_init = init_clip_ranges(info["raw_config"], info.get("clip"))
        init_info = {"init": str(folder), "init_clip": list(info["clip"]) if "clip" in info else None,
                     "data_start": init_data_start(folder, data.meta, cfg.seed)}
    else:
        mc = preset(cfg.preset, model_length=length, vocab_size=data.vocab_size, dropout=cfg.dropout,
                    tokenizer=data.meta["tokenizer"], mask_id=data.meta.get("mask_id", data.vocab_size - 1),
                    bos_id=data.meta.get("bos_id"), eos_id=data.meta.get("eos_id"))
        torch.manual_seed(step_seed(cfg.seed, 0, 0, 0, 7))  # same initial weights on every rank
        model = DiT(mc)
    mc: ModelConfig = model.config
    data.check_compatible(tokenizer=mc.tokenizer, vocab_size=mc.vocab_size, seq_len=mc.model_length)
    if "mask_id" in data.meta and int(data.meta["mask_id"]) != mc.mask_id:
        raise DidError(f"data in {cfg.data} uses [MASK] id {data.meta['mask_id']} but the model uses {mc.mask_id}")
    mask_id = mc.mask_id

    train_rows = data.rows("train")
    val_rows = data.rows("validation") if "validation" in data.meta["splits"] else np.empty((0, length))
    schedule = RowSchedule(len(train_rows), cfg.batch_size, cfg.grad_accum, world, cfg.seed)
    if cfg.clip == "auto" and len(val_rows) < 2:
        raise DidError(f"--clip auto needs a validation split with at least 2 rows; {cfg.data} has {len(val_rows)}")

    # ---- clip ranges per block size
    if cfg.clip is None or cfg.clip == "auto":
        clip_ranges = {b: clip_from_init.get(b, FULL_RANGE) for b in sizes}
    else:
        clip_ranges = {b: (float(cfg.clip[0]), float(cfg.clip[1])) for b in sizes}

    # ---- optimiser, schedule, EMA
    model.to(device).train()
    ema = EMA(model, cfg.ema, device)
    # fused AdamW: one kernel over all tensors (also on CPU, where the update of the two
    # 50258-row embeddings is a large share of a small model's step)
    fused = device.type in ("cuda", "cpu")
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      fused=fused or None)
    except (RuntimeError, TypeError):  # a torch without the fused kernel for this device
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.compile:
        compile_model(model)
    warm = cfg.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    sampler = BlockSizeSampler(sizes, weights, cfg.seed)
    start_step = 0
    best: dict | None = None

    if resume_ckpt is not None:
        from safetensors.torch import load_file

        st_dir = resume_ckpt / ck.STATE_DIR
        raw = load_file(str(st_dir / "raw_model.safetensors"))
        load_state_dict_strict(model, raw, source=str(st_dir / "raw_model.safetensors"))
        ema_model, _ = load_model(resume_ckpt, device=device)
        ema.model.load_state_dict(ema_model.state_dict())
        optimizer.load_state_dict(ck.torch_load(st_dir / "optimizer.pt"))
        scheduler.load_state_dict(ck.torch_load(st_dir / "scheduler.pt"))
        set_rng_state(ck.torch_load(st_dir / "rng.pt"))
        state = json.loads((st_dir / "state.json").read_text())
        start_step = int(state["step"])
        ema.num_updates = int(state["ema_updates"])
        sampler.load_state_dict(state["block_sampler"])
        clip_ranges = {int(k): (float(v[0]), float(v[1])) for k, v in state["clip_ranges"].items()}
        best = state.get("best")
        init_info = state.get("init_info", {})

    if init_info.get("data_start"):
        schedule.start_at(*init_info["data_start"])
    model, optimizer = accel.prepare(model, optimizer)

    # ---- run folder
    if main:
        run.mkdir(parents=True, exist_ok=True)
        save_json({"train": dataclasses.asdict(cfg), "model": mc.to_dict(), "block_sizes": sizes, "block_weights": weights,
                   "world_size": world, "global_batch": schedule.rows_per_step, "data": data.meta, **init_info},
                  run / "config.json")
        if resume_ckpt is not None:
            _truncate_metrics(run / "metrics.jsonl", start_step)
    metrics_path = run / "metrics.jsonl"

    def log(event: dict) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(event) + "\n")

    # ---- validation batches (fixed rows, evenly spread over the split)
    n_val = min(len(val_rows), cfg.eval_batches * cfg.batch_size)
    val_idx = np.unique(np.linspace(0, len(val_rows) - 1, n_val).round().astype(np.int64)) if n_val else np.empty(0, np.int64)
    val_batches = [torch.from_numpy(np.asarray(val_rows[val_idx[i:i + cfg.batch_size]], dtype=np.int64)).to(device)
                   for i in range(0, len(val_idx), cfg.batch_size)]
    if cfg.clip == "auto" and len(val_batches) < 2:
        # one batch gives no variance: split the rows more finely
        half = max(1, len(val_idx) // 2)
        val_batches = [torch.from_numpy(np.asarray(val_rows[val_idx[i:i + half]], dtype=np.int64)).to(device)
                       for i in range(0, len(val_idx), half)]

    progress = TrainProgress(cfg.progress and main, cfg.steps, start_step, "finetune" if cfg.init else "train")
    if init_info.get("data_start") and start_step == 0:
        e, r = init_info["data_start"]
        progress.note(f"same data and seed as the --init run: reading on from epoch {e}, row {r} of its order")

    def evaluate(step: int) -> dict:
        ev: dict[str, Any] = {"event": "eval", "step": step, "time": time.time()}
        if not val_batches:
            return ev
        with accel.autocast():
            vals = {b: val_nelbo(ema.model, val_batches, b, mask_id, cfg.seed + 1_000_003) for b in sizes}
            if cfg.clip == "auto":
                chosen = {}
                for b in sizes:
                    rng_, var = search_clip(ema.model, val_batches, b, mask_id, cfg.seed + 2_000_003)
                    chosen[b] = rng_
                    ev[f"clip_variances_b{b}"] = var
                # every rank must train with the same ranges: rank 0 decides
                chosen = _broadcast(accel, chosen)
                clip_ranges.update(chosen)
        vals = _broadcast(accel, vals)
        for b, v in vals.items():
            ev[f"val_nelbo_b{b}"] = v
            ev[f"val_ppl_b{b}"] = math.exp(min(v, 700.0))
        ev["val_nelbo"] = float(np.mean(list(vals.values())))
        ev["val_ppl"] = math.exp(min(ev["val_nelbo"], 700.0))
        ev["clip_ranges"] = {str(b): list(r) for b, r in clip_ranges.items()}
        return ev

    def save(step: int, is_best: bool) -> Path | None:
        raw_sd = accel.get_state_dict(model)  # collective under FSDP: every rank calls it
        path = None
        if main:
            epoch, pos = schedule.position(step)
            state = {
                "step": step, "epoch": epoch, "position": pos, "rows_per_step": schedule.rows_per_step,
                "world_size": world, "seed": cfg.seed, "data_hash": data.meta.get("content_hash"), "ema_updates": ema.num_updates,
                "block_sampler": sampler.state_dict(), "block_sizes": sizes, "block_weights": weights,
                "clip_ranges": {str(b): list(r) for b, r in clip_ranges.items()}, "clip_mode": _clip_mode(cfg.clip),
                "best": best, "init_info": init_info,
            }
            extra = {"block_sizes": sizes, "block_size": sizes[0],
                     "clip_ranges": {str(b): list(r) for b, r in clip_ranges.items()}, "step": step}

            def write(folder: Path) -> None:
                from safetensors.torch import save_file

                save_model(ema.model, folder, extra_config=extra, clip=clip_ranges[sizes[0]])
                sd = folder / ck.STATE_DIR
                sd.mkdir()
                tensors = {"backbone." + k: v.detach().float().cpu().contiguous() for k, v in raw_sd.items()}
                save_file(tensors, str(sd / "raw_model.safetensors"), metadata={"format": "pt"})
                ck.torch_save(optimizer.state_dict(), sd / "optimizer.pt")
                ck.torch_save(scheduler.state_dict(), sd / "scheduler.pt")
                ck.torch_save(rng_state(), sd / "rng.pt")
                save_json(state, sd / "state.json")

            path = ck.save_checkpoint(run, step, write)
            if is_best:
                ck.write_best(run, path, {"step": step, **{k: v for k, v in (best or {}).items() if k != "checkpoint"}})
            ck.prune_checkpoints(run, cfg.keep_last)
        accel.wait_for_everyone()
        return path

    # ---- the loop
    interrupted = False
    last_ckpt: Path | None = None
    last_eval: dict = {}
    tokens_per_micro = cfg.batch_size * length
    window_loss, window_n, window_t0, window_tokens = 0.0, 0, time.perf_counter(), 0
    last_loss = float("nan")
    tok_rate = 0.0
    pool = ThreadPoolExecutor(max_workers=cfg.num_workers) if cfg.num_workers > 0 else None

    debug_rows = os.environ.get("DID_DEBUG_ROWS")  # tests: which rows each rank reads

    def load_batch(step: int, micro: int) -> np.ndarray:
        idx = schedule.indices(step, micro, rank)
        if debug_rows:
            with open(f"{debug_rows}.rank{rank}", "a") as f:
                f.write(json.dumps({"step": step + 1, "micro": micro, "rows": idx.tolist()}) + "\n")
        return np.asarray(train_rows[idx], dtype=np.int64)

    def batches_for(step: int):
        return [pool.submit(load_batch, step, m) if pool else None for m in range(cfg.grad_accum)]

    if start_step == 0 and cfg.eval_every > 0 and val_batches:
        last_eval = evaluate(0)
        log(last_eval)
        if "val_nelbo" in last_eval:
            progress.note(f"step 0: val NELBO {last_eval['val_nelbo']:.4f}" + _clip_note(cfg, clip_ranges))

    step = start_step
    t_start = time.perf_counter()
    pending = batches_for(step) if step < cfg.steps else None
    try:
        with Interrupt() as intr:
            while step < cfg.steps:
                block = sampler.draw()
                dcfg = DiffusionConfig(clip=clip_ranges[block], antithetic=True)
                torch.manual_seed(step_seed(cfg.seed, step, rank, 0, 1))  # dropout
                futures = pending
                pending = batches_for(step + 1) if pool and step + 1 < cfg.steps else None
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                for m in range(cfg.grad_accum):
                    rows = futures[m].result() if pool else load_batch(step, m)
                    x0 = torch.from_numpy(rows).to(device, non_blocking=True)
                    # same seed on every rank: the noise belongs to the global batch
                    g = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, 0, m, 2))
                    with accel.accumulate(model):
                        with accel.autocast():
                            loss = sharded_nelbo(model, x0, block, dcfg, mask_id, g, world, rank)
                        accel.backward(loss)
                    loss_sum += loss.detach().double()
                # one small all-reduce: loss, non-finite flag and Ctrl-C agree on every rank
                out_of_time = bool(cfg.time_limit) and time.perf_counter() - t_start > cfg.time_limit
                flags = torch.stack([loss_sum / cfg.grad_accum,
                                     (~torch.isfinite(loss_sum)).double(),
                                     torch.tensor(float(intr.flag), device=device, dtype=torch.float64),
                                     torch.tensor(float(out_of_time), device=device, dtype=torch.float64)])
                if world > 1:
                    flags = accel.reduce(flags, reduction="sum")
                    flags[0] /= world
                step_loss, nonfinite, stop_now = float(flags[0]), bool(flags[1] > 0), bool(flags[2] > 0)
                last_step = step + 1 == cfg.steps or bool(flags[3] > 0)
                if not nonfinite and cfg.grad_clip > 0:
                    norm = accel.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    if accel.scaler is None and not torch.isfinite(torch.as_tensor(norm)).item():
                        nonfinite = True
                if nonfinite:
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.on_nonfinite == "stop":
                        where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                        raise DidError(f"non-finite loss at step {step + 1} (block size {block}){where}")
                    log({"event": "skip", "step": step + 1, "block_size": block, "reason": "non-finite loss",
                         "time": time.time()})
                    progress.note(f"step {step + 1}: non-finite loss at block size {block}, step skipped")
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    ema.update(accel.unwrap_model(model))
                    window_loss += step_loss
                    window_n += 1
                scheduler.step()
                step += 1
                window_tokens += tokens_per_micro * cfg.grad_accum * world

                if step % cfg.log_every == 0 or last_step:
                    dt = time.perf_counter() - window_t0
                    tok_rate = window_tokens / dt if dt > 0 else 0.0
                    last_loss = window_loss / window_n if window_n else float("nan")
                    lr_now = scheduler.get_last_lr()[0]
                    log({"event": "train", "step": step, "loss": last_loss, "block_size": block,
                         "tokens_per_s": tok_rate, "lr": lr_now, "time": time.time()})
                    progress.update(step, f"loss {last_loss:.4f} | {fmt_rate(tok_rate)} tok/s | block {block} | lr {lr_now:.2e}", True)
                    window_loss, window_n, window_t0, window_tokens = 0.0, 0, time.perf_counter(), 0
                else:
                    progress.update(step, f"loss {step_loss:.4f} | {fmt_rate(tok_rate)} tok/s | block {block}", False)

                is_best = False
                if (cfg.eval_every > 0 and step % cfg.eval_every == 0) or last_step:
                    last_eval = evaluate(step)
                    if "val_nelbo" in last_eval:
                        if best is None or last_eval["val_nelbo"] < best["val_nelbo"]:
                            best = {"step": step, "val_nelbo": last_eval["val_nelbo"],
                                    **{f"val_nelbo_b{b}": last_eval[f"val_nelbo_b{b}"] for b in sizes}}
                            is_best = True
                        last_eval["best_step"] = best["step"]
                        progress.note(f"step {step}: val NELBO {last_eval['val_nelbo']:.4f} "
                                      f"({_per_block(last_eval, sizes)})"
                                      + _clip_note(cfg, clip_ranges))
                    log(last_eval)
                if is_best or (cfg.save_every > 0 and step % cfg.save_every == 0) or last_step or stop_now:
                    last_ckpt = save(step, is_best) or last_ckpt
                if stop_now:
                    interrupted = True
                    break
                if last_step:
                    break
    finally:
        progress.close()
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
    if interrupted:
        if main:
            print(f"did: interrupted at step {step}; saved {last_ckpt}", file=sys.stderr)
        raise KeyboardInterrupt
    result = {"step": step, "loss": last_loss, "tokens_per_s": tok_rate, "checkpoint": str(last_ckpt) if last_ckpt else None,
              "best": best, "clip_ranges": {str(b): list(r) for b, r in clip_ranges.items()}, "block_sizes": sizes}
    result.update({k: v for k, v in last_eval.items() if k.startswith("val_")})
    if main:
        msg = f"did: done at step {step}"
        if "val_nelbo" in last_eval:
            msg += f", val NELBO {last_eval['val_nelbo']:.4f}"
        print(f"{msg}; checkpoint {last_ckpt}", file=sys.stderr)
    return result


def _per_block(ev: dict, sizes: list[int]) -> str:
    return ", ".join(f"b{b} {ev['val_nelbo_b' + str(b)]:.4f}" for b in sizes)


def _clip_mode(clip: Any) -> str:
    return "auto" if clip == "auto" else ("init" if clip is None else "fixed")


def _clip_note(cfg: TrainConfig, ranges: dict) -> str:
    if cfg.clip != "auto":
        return ""
    return " | clip " + ", ".join(f"b{b} [{r[0]:g}, {r[1]:g}]" for b, r in ranges.items())


def _broadcast(accel, obj):
    if accel.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _check_resume(cfg: TrainConfig, saved: dict, sizes: list[int], weights: list[float], world: int) -> None:
    old = saved.get("train", {})
    for name in _RESUME_FIELDS:
        a, b = getattr(cfg, name), old.get(name)
        if isinstance(a, tuple):
            a = list(a)
        if b is not None and a != b:
            raise ConfigError(f"--resume: --{name.replace('_', '-')} {a} differs from the run's {b}")
    if saved.get("block_sizes") != sizes:
        raise ConfigError(f"--resume: --block-sizes {','.join(map(str, sizes))} differs from the run's "
                          f"{','.join(map(str, saved.get('block_sizes', [])))}")
    if not np.allclose(saved.get("block_weights", weights), weights):
        raise ConfigError(f"--resume: --block-weights differ from the run's {saved.get('block_weights')}")
    if saved.get("world_size", world) != world:
        print(f"did: warning: resuming with {world} processes instead of {saved['world_size']}: "
              "the data order changes from here on", file=sys.stderr)


def _truncate_metrics(path: Path, step: int) -> None:
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)
