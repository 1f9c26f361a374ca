"""What a training run keeps in its folder: `RunFolder`, the part of the `Trainer` that writes
config.json, metrics.jsonl and atomic checkpoints, and reads a checkpoint back to resume.

RUN/config.json holds the resolved settings (and the options, so `--config RUN` repeats the run),
RUN/metrics.jsonl one JSON object per event, RUN/checkpoints/step-N/ everything a resume needs
(docs/formats.md; the folder mechanics are did_cli.io.checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from did_cli.core.backbones import build_backbone
from did_cli.errors import DidError
from did_cli.io import checkpoint as ck
from did_cli.io import model_folder as mf
from did_cli.training import setup, sharding, tracking
from did_cli.training.console import LogWindow, fmt_rate
from did_cli.training.state import TrainState, rng_state, set_rng_state
from did_cli.util import save_json


class RunFolder:
    """Mixed into `Trainer`: its methods use the trainer's model, optimiser, state and settings."""

    def resume(self, folder: Path) -> None:
        """Restore everything a checkpoint holds: raw and EMA weights, optimiser, scheduler, RNG
        states and the bookkeeping of `TrainState`."""
        from safetensors.torch import load_file

        st_dir = folder / ck.STATE_DIR
        raw = load_file(str(st_dir / "raw_model.safetensors"))
        if self.sharded:  # checked whole on a plain copy, then every process keeps its pieces
            plain = build_backbone(self.unwrapped.config)
            mf.load_state_dict_strict(plain, raw, source=str(st_dir / "raw_model.safetensors"))
            sharding.load_full_state_dict(self.model, plain.state_dict())
        else:
            mf.load_state_dict_strict(self.unwrapped, raw, source=str(st_dir / "raw_model.safetensors"))
        ema_model, _ = mf.load_model(folder, device="cpu")
        self.ema.load(self.model, ema_model.state_dict())
        optim = ck.torch_load(st_dir / "optimizer.pt")
        sharding.load_optimizer_state(self.model, self.optimizer, optim, self.param_names)
        self.scheduler.load_state_dict(ck.torch_load(st_dir / "scheduler.pt"))
        set_rng_state(ck.torch_load(st_dir / "rng.pt"))
        self.state = TrainState.load(st_dir / "state.json")
        self.ema.num_updates = self.state.ema_updates
        self.sampler.load_state_dict(self.state.block_sampler)
        self.clip_ranges = self.state.clip_ranges_by_size()

    def write_run_config(self) -> None:
        if self.main:
            self.run.mkdir(parents=True, exist_ok=True)
            save_json(
                setup.run_config(
                    self.cfg,
                    self.unwrapped.config.to_dict(),
                    self.sizes,
                    self.weights,
                    self.world,
                    self.schedule.rows_per_step,
                    self.data.meta,
                    self.compiled,
                    self.state.init_info,
                ),
                self.run / "config.json",
            )
            if self.resume_ckpt is not None:
                setup.truncate_metrics(self.metrics_path, self.state.step)
        hp = tracking.hyperparameters(
            self.cfg.options, dataclasses.asdict(self.cfg), self.unwrapped.config.to_dict()
        )
        tracking.start(self.accel, self.run, hp)

    @property
    def metrics_path(self) -> Path:
        return self.run / "metrics.jsonl"

    def log(self, event: dict) -> None:
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(event) + "\n")
        tracking.log(self.accel, event)

    def save(self, step: int, is_best: bool) -> Path | None:
        """An atomic checkpoint of everything a resume needs; returns its folder (main process)."""
        # collectives under sharding: every rank gathers, the main process writes
        if self.sharded:
            raw_sd = sharding.full_state_dict(self.model)
        else:
            raw_sd = self.accel.get_state_dict(self.model)
        optim = sharding.optimizer_state(self.model, self.optimizer, self.param_names)
        ema_model = self.ema.full_model(self.model)
        path = None
        if self.main:
            st = self.state
            st.step, (st.epoch, st.position) = step, self.schedule.position(step)
            st.rows_per_step, st.world_size, st.ema_updates = (
                self.schedule.rows_per_step,
                self.world,
                self.ema.num_updates,
            )
            st.block_sampler = self.sampler.state_dict()
            st.seed, st.data_hash, st.block_sizes, st.block_weights = (
                self.cfg.seed,
                self.data.meta.get("content_hash"),
                self.sizes,
                self.weights,
            )
            st.clip_ranges = {str(b): list(r) for b, r in self.clip_ranges.items()}
            path = ck.save_checkpoint(
                self.run, step, lambda folder: self._write_checkpoint(folder, raw_sd, optim, ema_model)
            )
            if is_best:
                ck.write_best(
                    self.run,
                    path,
                    {"step": step, **{k: v for k, v in (st.best or {}).items() if k != "checkpoint"}},
                )
            ck.prune_checkpoints(self.run, self.cfg.keep_last)
        self.accel.wait_for_everyone()
        return path

    def _write_checkpoint(self, folder: Path, raw_sd: dict, optim: dict, ema_model: Any) -> None:
        from safetensors.torch import save_file

        extra = {
            "block_sizes": self.sizes,
            "block_size": self.sizes[0],
            "clip_ranges": self.state.clip_ranges,
            "step": self.state.step,
        }
        mf.save_model(ema_model, folder, extra_config=extra, clip=self.clip_ranges[self.sizes[0]])
        sd = folder / ck.STATE_DIR
        sd.mkdir()
        tensors = {"backbone." + k: v.detach().float().cpu().contiguous() for k, v in raw_sd.items()}
        save_file(tensors, str(sd / "raw_model.safetensors"), metadata={"format": "pt"})
        ck.torch_save(optim, sd / "optimizer.pt")  # keyed by parameter name: loads under any wrapper
        ck.torch_save(self.scheduler.state_dict(), sd / "scheduler.pt")
        ck.torch_save(rng_state(), sd / "rng.pt")
        self.state.save(sd / "state.json")

    def result(self, step: int, window: LogWindow) -> dict:
        result = {
            "step": step,
            "loss": window.last_loss,
            "tokens_per_s": window.rate,
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "best": self.state.best,
            "clip_ranges": {str(b): list(r) for b, r in self.clip_ranges.items()},
            "block_sizes": self.sizes,
        }
        result.update({k: v for k, v in self.last_eval.items() if k.startswith("val_")})
        if self.main:
            msg = f"did: done at step {step}"
            if "val_nelbo" in self.last_eval:
                msg += f", val NELBO {self.last_eval['val_nelbo']:.4f}"
            print(f"{msg}; checkpoint {self.last_ckpt}", file=sys.stderr)
        return result

    def account(self, step: int, res: Any, window: LogWindow, last: bool) -> None:
        """Non-finite handling, the metrics line and the progress display after a step."""
        cfg = self.cfg
        if res.nonfinite:
            if cfg.on_nonfinite == "stop":
                where = f"; the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else ""
                raise DidError(f"non-finite loss at step {step} (block size {res.block}){where}")
            self.log(
                {
                    "event": "skip",
                    "step": step,
                    "block_size": res.block,
                    "reason": "non-finite loss",
                    "time": time.time(),
                }
            )
            self.progress.note(f"step {step}: non-finite loss at block size {res.block}, step skipped")
        else:
            window.loss += res.loss
            window.n += 1
        window.tokens += cfg.batch_size * self.length * cfg.grad_accum * self.world
        if step % cfg.log_every == 0 or last:
            window.close()
            lr = self.scheduler.get_last_lr()[0]
            self.log(
                {
                    "event": "train",
                    "step": step,
                    "loss": window.last_loss,
                    "block_size": res.block,
                    "tokens_per_s": window.rate,
                    "lr": lr,
                    "time": time.time(),
                }
            )
            self.progress.update(
                step,
                f"loss {window.last_loss:.4f} | {fmt_rate(window.rate)} tok/s | block {res.block} | lr "
                f"{lr:.2e}",
                True,
            )
        else:
            self.progress.update(
                step, f"loss {res.loss:.4f} | {fmt_rate(window.rate)} tok/s | block {res.block}", False
            )

    def clip_note(self) -> str:
        if self.cfg.clip != "auto":
            return ""
        return " | clip " + ", ".join(f"b{b} [{r[0]:g}, {r[1]:g}]" for b, r in self.clip_ranges.items())
