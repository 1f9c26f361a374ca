"""One training loop for `did train` and `did finetune-mixscale`: the `Trainer`.

    from did_cli.training import TrainConfig, train
    train(TrainConfig(data="data/", out="run/", block_sizes=[4, "L"], block_weights=[0.9, 0.1]))

`Trainer(cfg)` reads in the order a run happens: `setup` (data, accelerator, model, optimiser;
`resume` restores a checkpoint), `train_step` (one optimiser step), `evaluate` (validation
NELBO, clip search), `save` (an atomic checkpoint), and `fit`, the loop around them.

Choices worth knowing (docs/train.md has the long form): one block size per optimisation step,
drawn by a seeded sampler every process advances identically (one mask per step, the same
shapes on every rank); data order, noise and dropout depend only on (seed, step, process), so a
resume continues bit for bit; the EMA weights are what validation scores and what
`model.safetensors` holds; validation uses fixed-seed t, so evaluations are comparable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from did_cli.core.diffusion import nelbo
from did_cli.core.model_config import DiffusionConfig
from did_cli.errors import DidError
from did_cli.io import checkpoint as ck
from did_cli.io.bounded import read_json
from did_cli.io.data import PreparedData
from did_cli.io.outputs import describe_folder, hold_run_folder, is_empty_folder
from did_cli.io.schemas import check_run_config
from did_cli.training import setup, sharding, tracking
from did_cli.training.clip_search import clip_grid, search_clip
from did_cli.training.console import Interrupt, LogWindow, TrainProgress
from did_cli.training.run_folder import RunFolder
from did_cli.training.state import (
    EMA,
    BlockSizeSampler,
    RowSchedule,
    TrainState,
    step_seed,
)
from did_cli.training.train_config import (
    TrainConfig,
    check_train_config,
    default_block_weights,
    normalise_weights,
    resolve_block_sizes,
)
from did_cli.training.val_nelbo import validation_figures


@dataclass
class StepResult:
    """What one optimiser step reports back to the loop (agreed on by every process)."""

    block: int
    loss: float
    nonfinite: bool
    interrupted: bool
    out_of_time: bool


class Trainer(RunFolder):
    def __init__(self, cfg: TrainConfig):
        check_train_config(cfg)
        if not Path(cfg.data).exists():
            raise DidError(f"--data {cfg.data}: no such folder")
        self.cfg = cfg
        self.data = PreparedData(cfg.data)
        self.length = self.data.seq_len
        if cfg.model_length is not None and cfg.model_length != self.length:
            raise DidError(
                f"--model-length {cfg.model_length} differs from the data's seq_len {self.length} in "
                f"{cfg.data}"
            )
        self.sizes = resolve_block_sizes(list(cfg.block_sizes), self.length)
        weights = cfg.block_weights
        if weights is None:
            weights = default_block_weights(cfg.block_sizes)
        self.weights = normalise_weights(weights, len(self.sizes))
        self.run = Path(cfg.out)
        if self.run.exists() and not self.run.is_dir():
            raise DidError(f"--out {self.run}: exists and is not a folder")
        self.resume_ckpt: Path | None = None
        if cfg.resume:
            self.resume_ckpt = ck.latest_checkpoint(self.run)
            if self.resume_ckpt is None:
                raise DidError(f"--resume: no complete checkpoint in {self.run}")
        elif ck.list_checkpoints(self.run):
            raise DidError(
                f"{self.run} already holds checkpoints; pass --resume to continue it or choose another --out"
            )
        elif not is_empty_folder(self.run):  # never write config.json over someone's files
            raise DidError(
                f"--out {self.run} is not empty ({describe_folder(self.run)}) and holds no checkpoint to "
                "--resume"
            )
        self.state = TrainState(
            seed=cfg.seed,
            block_sizes=self.sizes,
            block_weights=self.weights,
            clip_mode=_clip_mode(cfg.clip),
            data_hash=self.data.meta.get("content_hash"),
        )
        self.last_ckpt: Path | None = None
        self.last_eval: dict = {}
        self.pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------------------- setup

    def setup(self) -> Trainer:
        cfg, data = self.cfg, self.data
        self.accel = accel = setup.make_accelerator(cfg)
        self.device, self.rank, self.world, self.main = (
            accel.device,
            accel.process_index,
            accel.num_processes,
            accel.is_main_process,
        )
        if self.resume_ckpt is not None:
            saved = check_run_config(read_json(self.run / "config.json"), str(self.run / "config.json"))
            sm = saved.get(
                "model", {}
            )  # data from another tokenizer / length: say so, not "--block-sizes differ"
            data.check_compatible(
                tokenizer=sm.get("tokenizer", "gpt2"),
                vocab_size=sm.get("vocab_size", data.vocab_size),
                seq_len=sm.get("model_length"),
            )
            setup.check_resume(cfg, saved, self.sizes, self.weights, self.world)
        model, clip_from_init, self.state.init_info = setup.build_model(
            cfg, data, self.run, self.resume_ckpt, accel
        )
        setup.check_model_fits_data(model.config, data)
        self.mask_id = model.config.mask_id

        self.train_rows = data.rows("train")
        val_rows = (
            data.rows("validation") if "validation" in data.meta["splits"] else np.empty((0, self.length))
        )
        self.schedule = RowSchedule(
            len(self.train_rows), cfg.batch_size, cfg.grad_accum, self.world, cfg.seed
        )
        if cfg.tokens:  # a token budget: the steps follow from the global batch
            self.cfg = cfg = dataclasses.replace(
                cfg, steps=max(1, math.ceil(cfg.tokens / (self.schedule.rows_per_step * self.length)))
            )
        if self.main:
            setup.check_warmup(cfg)
        if cfg.clip == "auto" and len(val_rows) < 2:
            raise DidError(
                f"--clip auto needs a validation split with at least 2 rows; {cfg.data} has {len(val_rows)}"
            )
        self.clip_ranges, self.searched = setup.clip_ranges(cfg, self.sizes, self.length, clip_from_init)

        model.to(self.device).train().set_checkpointing(cfg.activation_checkpointing)
        self.ema = EMA(model, cfg.ema, self.device)
        self.optimizer, self.scheduler = setup.make_optimizer(model, cfg, self.device)
        self.compiled = setup.compile_model(model, cfg.compile)
        self.sampler = BlockSizeSampler(self.sizes, self.weights, cfg.seed)
        self.model = model
        self.param_names = [name for name, _ in model.named_parameters()]  # the optimiser's order
        self.prepare()
        # a resume loads after the wrapping: under FSDP the parameters the optimiser updates are
        # final only then
        self.sharded = sharding.is_sharded(self.model)
        self.ema.attach(self.model)
        if self.resume_ckpt is not None:
            self.resume(self.resume_ckpt)
        if self.state.init_info.get("data_start"):
            self.schedule.start_at(*self.state.init_info["data_start"])
        self.write_run_config()
        self.val_batches = setup.validation_batches(val_rows, cfg, self.device)
        self.clip_batches = setup.clip_search_batches(val_rows, cfg, self.device) if self.searched else []
        return self

    def prepare(self) -> None:
        """Hand the model and optimiser to Accelerate, which wraps them as the launch asks (DDP,
        FSDP1, FSDP2, or nothing)."""
        self.model, self.optimizer = self.accel.prepare(self.model, self.optimizer)

    @property
    def unwrapped(self):
        return self.accel.unwrap_model(self.model)

    # ---------------------------------------------------------------------------- one step

    def load_batch(self, step: int, micro: int) -> np.ndarray:
        idx = self.schedule.indices(step, micro, self.rank)
        debug_rows = os.environ.get("DID_DEBUG_ROWS")  # tests: which rows each rank reads
        if debug_rows:
            with open(f"{debug_rows}.rank{self.rank}", "a") as f:
                f.write(json.dumps({"step": step + 1, "micro": micro, "rows": idx.tolist()}) + "\n")
        return np.asarray(self.train_rows[idx], dtype=np.int64)

    def prefetch(self, step: int) -> list | None:
        """Futures of the micro-batches of `step` (background threads), or None without a pool."""
        if self.pool is None or step >= self.cfg.steps:
            return None
        return [self.pool.submit(self.load_batch, step, m) for m in range(self.cfg.grad_accum)]

    def train_step(self, step: int, futures: list | None, intr: Interrupt, t_start: float) -> StepResult:
        """Forward and backward over the micro-batches of `step`, then one optimiser update (or
        none when the loss is not finite)."""
        cfg, accel = self.cfg, self.accel
        block = self.sampler.draw()
        dcfg = DiffusionConfig(clip=self.clip_ranges[block], antithetic=True, resample=cfg.resample)
        torch.manual_seed(step_seed(cfg.seed, step, self.rank, 0, 1))  # dropout
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for m in range(cfg.grad_accum):
            rows = futures[m].result() if futures else self.load_batch(step, m)
            x0 = torch.from_numpy(rows).to(self.device, non_blocking=True)
            # same seed on every rank: the noise belongs to the global batch
            g = torch.Generator(device=self.device).manual_seed(step_seed(cfg.seed, step, 0, m, 2))
            with accel.accumulate(self.model):
                with accel.autocast():
                    loss = nelbo(
                        self.model, x0, block, dcfg, self.mask_id, g, world=self.world, rank=self.rank
                    ).loss
                accel.backward(loss)
            loss_sum += loss.detach().double()
        # one small all-reduce: loss, non-finite flag, Ctrl-C and the time limit agree on every rank
        out_of_time = bool(cfg.time_limit) and time.perf_counter() - t_start > cfg.time_limit
        flags = torch.tensor(
            [0.0, 0.0, float(intr.flag), float(out_of_time)], device=self.device, dtype=torch.float64
        )
        flags[0], flags[1] = loss_sum / cfg.grad_accum, (~torch.isfinite(loss_sum)).double()
        if self.world > 1:
            flags = accel.reduce(flags, reduction="sum")
            flags[0] /= self.world
        res = StepResult(block, float(flags[0]), bool(flags[1] > 0), bool(flags[2] > 0), bool(flags[3] > 0))
        if not res.nonfinite and cfg.grad_clip > 0:
            norm = sharding.clip_grad_norm(accel, self.model, cfg.grad_clip)
            if accel.scaler is None and not torch.isfinite(torch.as_tensor(norm)).item():
                res.nonfinite = True
        if res.nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.model)
        self.scheduler.step()
        return res

    # ---------------------------------------------------------------------- evaluate, save

    def evaluate(self, step: int) -> dict:
        """Validation NELBO (with standard errors) of the EMA weights at every block size, and,
        with --clip auto, the clip search; every rank gets rank 0's figures and ranges."""
        ev: dict[str, Any] = {"event": "eval", "step": step, "time": time.time()}
        if not self.val_batches:
            return ev
        cfg = self.cfg
        ema_model = self.ema.full_model(self.model)  # collective under sharding
        with self.accel.autocast():
            vals = validation_figures(
                ema_model,
                self.val_batches,
                self.sizes,
                self.mask_id,
                cfg.seed + 1_000_003,
                cfg.val_draws,
                cfg.val_weight,
            )
            chosen = {}
            for b in self.searched:
                chosen[b], ev[f"clip_scores_b{b}"] = search_clip(
                    ema_model,
                    self.clip_batches,
                    b,
                    self.mask_id,
                    cfg.seed + 2_000_003,
                    clip_grid(cfg.clip_widths, cfg.clip_delta),
                    cfg.resample,
                    report=self.progress.note,
                )
            self.clip_ranges.update(setup.broadcast(self.accel, chosen))
        ev.update(setup.broadcast(self.accel, vals))
        ev["clip_ranges"] = {str(b): list(r) for b, r in self.clip_ranges.items()}
        if self.searched:
            ev["clip_searched"] = self.searched
        return ev

    # --------------------------------------------------------------------------------- fit

    def fit(self) -> dict:
        """Train from the current step to `cfg.steps` (or the time limit, or Ctrl-C); evaluate,
        checkpoint and log on the way. Returns the final metrics."""
        cfg = self.cfg
        self.progress = TrainProgress(
            cfg.progress and self.main,
            cfg.steps,
            self.state.step,
            "adapt" if getattr(cfg, "source", "") else "finetune" if cfg.init else "train",
        )
        start = self.state.init_info.get("data_start")
        if start and self.state.step == 0:
            self.progress.note(
                f"same data and seed as the --init run: reading on from epoch {start[0]}, row {start[1]} "
                "of its order"
            )
        if self.state.step == 0 and cfg.eval_every > 0 and self.val_batches:
            self.last_eval = self.evaluate(0)
            self.log(self.last_eval)
            if "val_nelbo" in self.last_eval:
                self.progress.note(f"step 0: val NELBO {self.last_eval['val_nelbo']:.4f}" + self.clip_note())
        self.pool = ThreadPoolExecutor(max_workers=cfg.num_workers) if cfg.num_workers > 0 else None
        window = LogWindow()
        step = self.state.step
        interrupted = False
        t_start = time.perf_counter()
        pending = self.prefetch(step)
        try:
            with Interrupt() as intr:
                while step < cfg.steps:
                    futures, pending = pending, self.prefetch(step + 1)
                    res = self.train_step(step, futures, intr, t_start)
                    step += 1
                    last = step == cfg.steps or res.out_of_time
                    self.account(step, res, window, last)
                    is_best = self._maybe_evaluate(step, last)
                    if (
                        is_best
                        or (cfg.save_every > 0 and step % cfg.save_every == 0)
                        or last
                        or res.interrupted
                    ):
                        self.last_ckpt = self.save(step, is_best) or self.last_ckpt
                    self.ema.release()  # a whole EMA model gathered for them (sharded runs)
                    if res.interrupted:
                        interrupted = True
                        break
                    if last:
                        break
        finally:
            self.progress.close()
            tracking.end(self.accel)
            if self.pool:
                self.pool.shutdown(wait=False, cancel_futures=True)
        if interrupted:
            if self.main:
                print(f"did: interrupted at step {step}; saved {self.last_ckpt}", file=sys.stderr)
            raise KeyboardInterrupt
        return self.result(step, window)

    def _maybe_evaluate(self, step: int, last: bool) -> bool:
        """Evaluate when due; True when this step's EMA weights are the best so far."""
        if not ((self.cfg.eval_every > 0 and step % self.cfg.eval_every == 0) or last):
            return False
        ev = self.last_eval = self.evaluate(step)
        is_best = False
        if "val_nelbo" in ev:
            best = self.state.best
            # a NaN validation (weights blown up under --on-nonfinite skip) is never the best
            if math.isfinite(ev["val_nelbo"]) and (best is None or ev["val_nelbo"] < best["val_nelbo"]):
                self.state.best = {
                    "step": step,
                    **{k: v for k, v in ev.items() if k.startswith(("val_nelbo", "val_rows"))},
                }
                is_best = True
            if self.state.best is not None:
                ev["best_step"] = self.state.best["step"]
            per_block = ", ".join(f"b{b} {ev['val_nelbo_b' + str(b)]:.4f}" for b in self.sizes)
            self.progress.note(
                f"step {step}: val NELBO {ev['val_nelbo']:.4f} ({per_block})" + self.clip_note()
            )
        self.log(ev)
        return is_best


def train(cfg: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) and return the final metrics. The run folder is locked
    for the run (did_cli.io.locks: a second process training it is refused), and a run that
    fails before its first checkpoint leaves the folder as it found it."""
    with hold_run_folder(cfg.out, "did " + (cfg.options or {}).get("command", "train"), cfg.resume):
        return Trainer(cfg).setup().fit()


def _clip_mode(clip: Any) -> str:
    return "auto" if clip == "auto" else ("init" if clip is None else "fixed")
