"""Training: one loop for `did train`, `did finetune-mixscale` and `did adapt`.

    from did_cli.training import TrainConfig, train
    train(TrainConfig(data="data/", out="run/", block_sizes=[4, "L"], block_weights=[0.9, 0.1]))

Modules, in the order a run uses them: `config` (TrainConfig and its checks, no torch),
`init_source` (where --init weights come from), `adapt_config` and `adapt` (a pretrained causal
LM as the starting model), `setup` (accelerator, model, optimiser),
`state` (what a checkpoint restores: TrainState, the row schedule, the block-size sampler, EMA,
RNG), `sharding` (weights, EMA and optimiser state under FSDP1/FSDP2), `trainer` (setup /
resume / step / evaluate / save / fit), `val_nelbo` and `clip_search` (evaluation during
training), `console` (progress and Ctrl-C), `tracking` (--log-with: Accelerate's experiment
trackers). Names are imported on first use, so reading the settings does not import torch or
Accelerate.
"""

import importlib

_NAMES = {
    "TrainConfig": "train_config",
    "MixScaleConfig": "train_config",
    "AdaptConfig": "adapt_config",
    "Trainer": "trainer",
    "train": "trainer",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"did_cli.training.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'did_cli.training' has no attribute {name!r}")


__all__ = list(_NAMES)
