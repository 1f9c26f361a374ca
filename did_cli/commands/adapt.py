"""`did adapt`: options -> AdaptConfig -> did_cli.training.train (a pretrained causal LM as the
starting model). The training-loop options are `did train`'s, with AdaptConfig's defaults."""

from __future__ import annotations

from typing import Any

from did_cli.commands.builder import command
from did_cli.commands.config_file import record
from did_cli.commands.options import Opt
from did_cli.commands.train import (
    CLIP,
    CLIP_SEARCH,
    DATA,
    LOG_WITH,
    MIXED_PRECISION,
    OUT,
    RUNTIME,
    block_mix,
    config_from_options,
    loop_options,
    run_training,
    saved_run_options,
)
from did_cli.training.adapt_config import AdaptConfig, check_adapt_config


def _adapt(**kw: Any) -> None:
    """Turn a pretrained causal LM (folder, GGUF or hub name) into a block-diffusion model and
    train it with the mix-scale block sizes."""
    kw["options"] = record("adapt", kw)
    cfg = config_from_options(block_mix(kw), AdaptConfig)
    check_adapt_config(cfg)
    run_training(cfg)


adapt = command(
    _adapt,
    [
        Opt("source", AdaptConfig, flags=("--from",), type=str, default=...),
        DATA,
        OUT,
        Opt("shift", AdaptConfig, flags=("--shift/--no-shift",)),
        Opt("block_sizes", AdaptConfig, extra="Comma-separated, e.g. 4,L or 4,1024."),
        Opt("block_weights", AdaptConfig, type=str),
        Opt("steps", AdaptConfig),
        Opt("tokens", AdaptConfig),
        *loop_options(AdaptConfig),
        CLIP,
        *CLIP_SEARCH,
        MIXED_PRECISION,
        LOG_WITH,
        *RUNTIME,
    ],
    name="adapt",
    config=True,
    implicit=saved_run_options,
)
