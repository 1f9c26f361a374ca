"""`TrainConfig`: every setting of one training run, with the checks that need no data.

The CLI builds it from the options of `did train` / `did finetune-mixscale` (their --help texts
are these field docstrings); a Python user builds it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

from did_cli.core.model_config import (
    FULL_LENGTH,
    PRESETS,
    DiffusionConfig,
    check_block_sizes,
    check_head_split,
    parse_block_sizes,
    resolve_block_size,
)
from did_cli.errors import UsageError

FULL_RANGE = (0.0, 1.0)
DEFAULT_BLOCK_SIZES = [4, FULL_LENGTH]
DEFAULT_BLOCK_WEIGHTS = (0.9, 0.1)

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
    block_sizes: list[BlockSize] = field(default_factory=lambda: list(DEFAULT_BLOCK_SIZES))
    """Block sizes to train on; 'L' (or 'length') is the full sequence length."""
    block_weights: list[float] | None = None
    """Probability of each block size per step (normalised). Default: 0.9,0.1 for the default 4,L;
    equal otherwise."""
    steps: int = 1000
    """Total optimiser steps (a resumed run continues up to this number)."""
    tokens: int | None = None
    """Token budget instead of `steps`: steps = ceil(tokens / (global batch rows x L))."""
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
    val_draws: int | None = None
    """Noise draws per validation row (None: enough for 2 noise levels per row, i.e. 1 for
    blocks of at most L/2 and 2 at the global block)."""
    val_weight: str = "posterior"
    """Validation NELBO weight of a masked token's loss: 'posterior' (E[1/t | the block's masked
    count]: the same bound, far less noise) or 'inverse-t' (BD3-LM's 1/t)."""
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
    """t range: (beta, omega), 'auto' (BD3-LM's variance search per block size at each
    evaluation; the global block L keeps the full range unless `clip_global`), or None ((0, 1),
    or the learned range stored with --init for its block size)."""
    resample: bool = True
    """Inside a clipped range, redraw a block's mask until its masked fraction lies in the range
    (BD3-LM's training.resample, on in its training scripts); no effect on the full range."""
    clip_widths: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    """--clip auto grid: for each width w the ranges (i, i + w), i = 0, delta, ..., 1 - w (a low
    end of 0 becomes 1e-3), plus (1e-3, 1) (BD3-LM's fine-tune scripts: 0.5 to 0.9)."""
    clip_delta: float = 0.05
    """--clip auto grid step of the low end (BD3-LM: 0.05)."""
    clip_batches: int = 100
    """--clip auto: validation batches (of batch_size rows, at least 2) each candidate is scored
    on (BD3-LM: at most 100)."""
    clip_global: bool = False
    """--clip auto also searches the global block L (BD3-LM and the paper never clip it)."""
    mixed_precision: str = "auto"
    """no, bf16, fp16, or auto (bf16 on CUDA, else no)."""
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
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward instead of keeping them:
    about a third more compute for a fraction of the activation memory (docs/train.md has the
    figures at L = 1024); the gradients are the same."""
    time_limit: float | None = None
    """Stop after this many seconds of training (evaluating and saving as at the last step)."""
    layers: int | None = None
    """Transformer layers of a fresh model (default: the preset's)."""
    hidden: int | None = None
    """Model width of a fresh model (default: the preset's); a multiple of --heads."""
    heads: int | None = None
    """Attention heads of a fresh model (default: the preset's); the head width hidden/heads must be even."""
    mlp_ratio: int | None = None
    """MLP width of a fresh model as a multiple of --hidden (default: the preset's, 4)."""
    cond_dim: int | None = None
    """Width of the conditioning (time) embedding of a fresh model (default: the preset's)."""
    log_with: str | None = None
    """Experiment trackers besides metrics.jsonl, comma-separated: tensorboard, wandb, mlflow,
    trackio, aim, comet_ml, clearml, dvclive, swanlab (through Accelerate; each needs its
    package)."""
    options: dict | None = None
    """The command's resolved options (saved in the run's config.json, which is then a valid
    --config); None for a run built in Python."""


SIZE_FLAGS = {
    "layers": "n_layers",
    "hidden": "hidden_dim",
    "heads": "n_heads",
    "mlp_ratio": "mlp_ratio",
    "cond_dim": "cond_dim",
}


def model_overrides(cfg: TrainConfig) -> dict[str, int]:
    """The ModelConfig fields the size options set (only those given)."""
    return {
        field_name: getattr(cfg, opt)
        for opt, field_name in SIZE_FLAGS.items()
        if getattr(cfg, opt) is not None
    }


def check_model_size(cfg: TrainConfig) -> None:
    """The size options against each other and the preset, before any data is read."""

    given = {opt: getattr(cfg, opt) for opt in SIZE_FLAGS if getattr(cfg, opt) is not None}
    for opt, v in given.items():
        if v < 1:
            raise UsageError(f"--{opt.replace('_', '-')} {v}: must be >= 1")
    if given and cfg.init:
        raise UsageError(
            f"--{next(iter(given)).replace('_', '-')}: the model comes from --init; size options are for "
            "a fresh model"
        )
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown --preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    hidden = cfg.hidden or PRESETS[cfg.preset]["hidden_dim"]
    check_head_split(hidden, cfg.heads or PRESETS[cfg.preset]["n_heads"], "--hidden", "--heads")


# ------------------------------------------------------------------------------------ checks


def resolve_block_sizes(sizes: list[BlockSize], length: int) -> list[int]:
    """Block sizes as given (integers, 'L', or text of either) -> integers dividing `length`."""
    out = [resolve_block_size(b, length) for b in parse_block_sizes(list(sizes))]
    check_block_sizes(out, length, "--block-sizes")
    if len(set(out)) != len(out):
        raise UsageError(f"--block-sizes {','.join(map(str, out))}: a block size appears twice")
    return out


def default_block_weights(sizes: list[BlockSize]) -> list[float] | None:
    """The weights when none are given: the DiD mix (drafting block most of the time, the global
    block 10%) for the default sizes, equal weights (None) otherwise."""
    if parse_block_sizes(list(sizes)) == DEFAULT_BLOCK_SIZES:
        return list(DEFAULT_BLOCK_WEIGHTS)
    return None


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
    positive = dict(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        eval_batches=cfg.eval_batches,
        log_every=cfg.log_every,
        clip_batches=cfg.clip_batches,
        tokens=cfg.tokens or 1,
        val_draws=cfg.val_draws or 1,
    )
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
    if cfg.val_weight not in ("posterior", "inverse-t"):
        raise UsageError(f"--val-weight {cfg.val_weight!r}: choose posterior or inverse-t")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise UsageError(f"--on-nonfinite {cfg.on_nonfinite!r}: choose stop or skip")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise UsageError(f"--mixed-precision {cfg.mixed_precision!r}: choose auto, no, bf16 or fp16")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise UsageError(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if isinstance(cfg.clip, str) and cfg.clip != "auto":
        raise UsageError(f"--clip {cfg.clip!r}: expected auto, none or BETA,OMEGA")
    if cfg.clip is not None and not isinstance(cfg.clip, str):
        DiffusionConfig(clip=tuple(cfg.clip))  # raises UsageError on a bad range
    if cfg.clip == "auto":
        from did_cli.training.clip_search import clip_grid

        try:
            clip_grid(cfg.clip_widths, cfg.clip_delta)
        except ValueError:
            raise UsageError(
                f"--clip-widths {','.join(map(str, cfg.clip_widths))} / --clip-delta {cfg.clip_delta}: "
                "widths must be in (0, 1] and delta > 0"
            ) from None
    check_model_size(cfg)
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
    """Fraction of the baseline fine-tuning budget, counted in tokens (the paper: 26%)."""
    baseline_steps: int = 150_000
    """Baseline fine-tuning steps (BD3-LM: 150K)."""
    baseline_batch_tokens: int = 512 * 1024
    """Tokens per optimiser step of the baseline (BD3-LM: a global batch of 512 rows of 1024
    tokens), so that the budget means the same tokens whatever this run's batch."""

    def budget_tokens(self) -> int:
        return max(1, round(self.budget_fraction * self.baseline_steps * self.baseline_batch_tokens))

    def apply(self, cfg: TrainConfig, steps: int | None) -> TrainConfig:
        """`cfg` with the mix's block sizes and weights, and `steps` (None: the budget fraction
        of the baseline's tokens, turned into steps by the trainer from its global batch)."""
        import dataclasses

        if not 0.0 <= self.global_weight <= 1.0:
            raise UsageError(f"--global-weight {self.global_weight}: must be in [0, 1]")
        tokens = None
        if steps is None:
            if not self.budget_fraction > 0 or self.baseline_steps < 1 or self.baseline_batch_tokens < 1:
                raise UsageError(
                    "--budget-fraction must be > 0, --baseline-steps and --baseline-batch-tokens >= 1"
                )
            tokens = self.budget_tokens()
        return dataclasses.replace(
            cfg,
            block_sizes=[self.draft_block, "L"],
            steps=steps or cfg.steps,
            tokens=tokens,
            block_weights=[1.0 - self.global_weight, self.global_weight],
        )
