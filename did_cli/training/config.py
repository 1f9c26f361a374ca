"""`TrainConfig`: every setting of one training run, with the checks that need no data.

The CLI builds it from the options of `did train` / `did finetune-mixscale` (their --help texts
are these field docstrings); a Python user builds it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

from did_cli.config import DiffusionConfig, check_block_sizes
from did_cli.errors import UsageError

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
    compile: bool | None = None
    """torch.compile the embedding and transformer blocks: one graph per (shape, grad mode), the
    block size is an input (the first steps compile). Default (None): on CUDA only, since
    inductor on a CPU compiles for minutes."""
    time_limit: float | None = None
    """Stop after this many seconds of training (evaluating and saving as at the last step)."""


# ------------------------------------------------------------------------------------ checks


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
                raise UsageError(f"--block-sizes: {b!r} is not an integer or 'L'") from None
        out.append(int(b))
    if not out:
        raise UsageError("--block-sizes: empty list")
    check_block_sizes(out, length, "--block-sizes")
    if len(set(out)) != len(out):
        raise UsageError(f"--block-sizes {','.join(map(str, out))}: a block size appears twice")
    return out


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise UsageError(f"--block-weights has {len(w)} values for {n} --block-sizes")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise UsageError(f"--block-weights {','.join(map(str, w))}: weights must be finite and >= 0")
    total = sum(w)
    if total <= 0:
        raise UsageError("--block-weights: the weights sum to 0")
    return [x / total for x in w]


def check_train_config(cfg: TrainConfig) -> None:
    """Eager checks of the settings alone (the data and the model are checked later)."""
    positive = dict(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, eval_batches=cfg.eval_batches,
                    log_every=cfg.log_every)
    for name, v in positive.items():
        if v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    for name in ("warmup", "eval_every", "save_every", "keep_last", "num_workers"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 0")
    if not cfg.lr > 0:
        raise UsageError(f"--lr {cfg.lr}: must be > 0")
    if not 0.0 <= cfg.ema < 1.0:
        raise UsageError(f"--ema {cfg.ema}: must be in [0, 1)")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise UsageError(f"--on-nonfinite {cfg.on_nonfinite!r}: choose stop or skip")
    if cfg.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise UsageError(f"--mixed-precision {cfg.mixed_precision!r}: choose no, bf16 or fp16")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise UsageError(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if isinstance(cfg.clip, str) and cfg.clip != "auto":
        raise UsageError(f"--clip {cfg.clip!r}: expected auto, none or BETA,OMEGA")
    if cfg.clip is not None and not isinstance(cfg.clip, str):
        DiffusionConfig(clip=tuple(cfg.clip))  # raises UsageError on a bad range
    if cfg.clip == "auto" and cfg.eval_batches < 2:
        raise UsageError("--clip auto needs --eval-batches >= 2 (it compares loss variances across batches)")
    if not cfg.data:
        raise UsageError("--data is required")
    if not cfg.out:
        raise UsageError("--out is required")


@dataclass
class MixScaleConfig:
    """The block-size mix of `did finetune-mixscale` (the paper's bimodal distribution)."""

    draft_block: int = 4
    """The small drafting block size (weight 1 - lambda)."""
    global_weight: float = 0.1
    """lambda: probability of the global block L per step."""
    budget_fraction: float = 0.26
    """Fraction of the baseline fine-tuning budget (the paper: 26%)."""
    baseline_steps: int = 150_000
    """Baseline fine-tuning steps (BD3-LM: 150K)."""

    def apply(self, cfg: TrainConfig, steps: int | None) -> TrainConfig:
        """`cfg` with the mix's block sizes and weights, and `steps` (None: the budget fraction
        of the baseline)."""
        import dataclasses

        if not 0.0 <= self.global_weight <= 1.0:
            raise UsageError(f"--global-weight {self.global_weight}: must be in [0, 1]")
        if steps is None:
            if not self.budget_fraction > 0 or self.baseline_steps < 1:
                raise UsageError("--budget-fraction must be > 0 and --baseline-steps >= 1")
            steps = max(1, round(self.budget_fraction * self.baseline_steps))
        return dataclasses.replace(cfg, block_sizes=[self.draft_block, "L"], steps=steps,
                                   block_weights=[1.0 - self.global_weight, self.global_weight])
