"""`did train` and `did finetune-mixscale`: options -> TrainConfig -> did_cli.training.train.

Both commands (and `did adapt`, did_cli.commands.adapt) share the options of the training loop
(declared once below); their defaults and --help texts are the field defaults and docstrings
of the command's settings class (TrainConfig, or AdaptConfig with its own defaults).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from did_cli.commands.builder import command
from did_cli.commands.config_file import record
from did_cli.commands.options import Opt, fields_of
from did_cli.core.model_config import parse_block_sizes, parse_clip, parse_float_list
from did_cli.errors import DidError, UsageError
from did_cli.training.train_config import MixScaleConfig, TrainConfig

LOOP_FIELDS = (
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "weight_decay",
    "betas",
    "grad_clip",
    "ema",
    "eval_every",
    "eval_batches",
    "val_draws",
    "val_weight",
    "save_every",
    "keep_last",
    "log_every",
    "seed",
    "resume",
)


def loop_options(cls: type = TrainConfig) -> list:
    """The training-loop options, with defaults and help from `cls` (a TrainConfig class)."""
    return fields_of(cls, *LOOP_FIELDS)


LOOP = loop_options(TrainConfig)
CLIP = Opt(
    "clip",
    type=str,
    default=None,
    help="t range: auto (BD3-LM's search at each evaluation; not the global block unless --clip-global), "
    "none "
    "(= 0,1) or BETA,OMEGA. Default: 0,1, or the learned range stored with --init.",
)
CLIP_SEARCH = [
    Opt("resample", TrainConfig, flags=("--resample/--no-resample",)),
    Opt("clip_widths", TrainConfig, type=str, extra="Comma-separated."),
    *fields_of(TrainConfig, "clip_delta", "clip_batches", "clip_global"),
]
MIXED_PRECISION = Opt("mixed_precision", TrainConfig)
RUNTIME = fields_of(TrainConfig, "dropout", "num_workers", "on_nonfinite") + [
    Opt("compile", TrainConfig, flags=("--compile/--no-compile",), type=bool),
    Opt(
        "activation_checkpointing",
        TrainConfig,
        flags=("--activation-checkpointing/--no-activation-checkpointing",),
        type=bool,
    ),
    Opt("time_limit", TrainConfig, extra="In seconds.", kw={"min": 0}),
    Opt("quiet", flags=("--quiet", "-q"), default=False, help="No progress output."),
]
DATA = Opt("data", TrainConfig, type=Path, default=...)
OUT = Opt("out", TrainConfig, type=Path, default=...)
SIZE = fields_of(
    TrainConfig,
    "layers",
    "hidden",
    "heads",
    "mlp_ratio",
    "cond_dim",
    kw={"rich_help_panel": "Model size (a fresh model; default: the preset's)"},
)
LOG_WITH = Opt("log_with", TrainConfig, type=str)


def saved_run_options(values: dict[str, Any]) -> Optional[Path]:
    """--resume: the run's config.json, whose saved options fill those not given (so
    `did train --out RUN --resume` is enough)."""
    if values.get("resume") and values.get("out") is not None:
        return Path(values["out"]) / "config.json"
    return None


def _clip(text: Optional[str]) -> Any:
    """None (not given) -> None; 'auto'; 'none' -> (0, 1); 'BETA,OMEGA' -> tuple."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip().lower() == "none":
        return (0.0, 1.0)
    return parse_clip(text, "--clip")


def _betas(text: str) -> tuple[float, float]:
    vals = parse_float_list(text, "--betas")
    if len(vals) != 2 or not all(0.0 <= v < 1.0 for v in vals):
        raise UsageError(f"--betas {text!r}: expected two numbers in [0, 1)")
    return vals[0], vals[1]


def config_from_options(kw: dict[str, Any], cls: type = TrainConfig) -> TrainConfig:
    """Option values of a training command -> its settings (`cls`: TrainConfig or a subclass)."""
    kw["clip"] = _clip(kw["clip"])
    kw["clip_widths"] = parse_float_list(kw["clip_widths"], "--clip-widths")
    kw["betas"] = _betas(kw["betas"])
    kw["data"], kw["out"] = str(kw["data"]), str(kw["out"])
    if kw.get("init") is not None:
        kw["init"] = str(kw["init"])
    kw["progress"] = not kw.pop("quiet")
    if kw.get("log_with") is not None:
        from did_cli.training.tracking import parse_log_with

        parse_log_with(kw["log_with"])  # an unknown or missing tracker fails before the data is read
    return cls(**kw)


def block_mix(kw: dict[str, Any]) -> dict[str, Any]:
    """`kw` with --block-sizes and --block-weights parsed from their text."""
    sizes = parse_block_sizes(kw.pop("block_sizes"))
    bw = kw.pop("block_weights")
    weights = None if bw is None else parse_float_list(bw, "--block-weights")
    return dict(kw, block_sizes=sizes, block_weights=weights)


def run_training(cfg: TrainConfig) -> None:
    from did_cli.training import train

    try:
        train(cfg)
    except OSError as e:  # run folder not creatable, metrics not writable, full disk...
        raise DidError(f"cannot write {e.filename or cfg.out}: {e.strerror or e}") from None


def _train(**kw: Any) -> None:
    """Train a block-diffusion model on prepared data over one or several block sizes."""
    kw["options"] = record("train", kw)
    run_training(config_from_options(block_mix(kw)))


train = command(
    _train,
    [
        DATA,
        OUT,
        Opt("preset", TrainConfig),
        Opt("block_sizes", TrainConfig, extra="Comma-separated, e.g. 4,L or 4,1024."),
        Opt("block_weights", TrainConfig, type=str),
        Opt("steps", TrainConfig),
        Opt("tokens", TrainConfig),
        *LOOP,
        Opt("init", TrainConfig),
        CLIP,
        *CLIP_SEARCH,
        MIXED_PRECISION,
        LOG_WITH,
        *RUNTIME[:1],
        Opt("model_length", TrainConfig),
        *RUNTIME[1:],
        *SIZE,
    ],
    name="train",
    config=True,
    implicit=saved_run_options,
)


def _finetune(**kw: Any) -> None:
    """Mix-scale fine-tune: block size --draft-block with weight 1-lambda, the global block L with lambda."""
    kw["options"] = record("finetune-mixscale", kw)
    mix = MixScaleConfig(
        **{
            k: kw.pop(k)
            for k in (
                "draft_block",
                "global_weight",
                "budget_fraction",
                "baseline_steps",
                "baseline_batch_tokens",
            )
        }
    )
    steps, tokens = kw.pop("steps"), kw.pop("tokens")
    if steps is not None and tokens is not None:
        raise UsageError("--steps and --tokens exclude each other")
    cfg = config_from_options(dict(kw, preset="tiny", model_length=None))
    cfg = mix.apply(cfg, steps if tokens is None else 1)
    try:
        run_training(cfg if tokens is None else dataclasses.replace(cfg, tokens=tokens))
    except (
        UsageError
    ) as e:  # the mix's block sizes come from --draft-block, not a --block-sizes the user passed
        if not str(e).startswith("--block-sizes"):
            raise
        raise UsageError(f"--draft-block {mix.draft_block}: {str(e).split(': ', 1)[-1]}") from None


finetune_mixscale = command(
    _finetune,
    [
        Opt("init", TrainConfig, type=str, default=...),
        DATA,
        OUT,
        *fields_of(MixScaleConfig, "draft_block", "global_weight"),
        Opt(
            "steps",
            type=int,
            default=None,
            help="Optimiser steps (default: the budget, --budget-fraction x --baseline-steps x "
            "--baseline-batch-tokens "
            "tokens, in steps of this run's global batch).",
        ),
        Opt("tokens", TrainConfig),
        *fields_of(MixScaleConfig, "budget_fraction", "baseline_steps", "baseline_batch_tokens"),
        *LOOP,
        CLIP,
        *CLIP_SEARCH,
        MIXED_PRECISION,
        LOG_WITH,
        *RUNTIME,
    ],
    name="finetune_mixscale",
    config=True,
    implicit=saved_run_options,
)
