"""One process of the CPU FSDP test (tests/test_fsdp.py), started twice with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set:

    python tests/fsdp_worker.py fsdp1|fsdp2|ddp DATA OUT COPY

Accelerate wraps models in FSDP only on GPUs, so `ShardedTrainer.prepare` wraps the model the
way Accelerate's FSDP plugin does with examples/accelerate/fsdp.yaml (FSDP1: the classes named
by the model's `_no_split_modules` auto-wrapped, FULL_SHARD, `use_orig_params`) or fsdp2.yaml
(FSDP2: `fully_shard` on each of those blocks, then on the root), and builds the optimiser
over the wrapped parameters (Accelerate re-points it the same way). Everything else is the
trainer's own code: its step, EMA, evaluation, checkpoint and resume, over gloo.

The run trains to step 2 (checkpoint), copies the run folder to COPY (for a one-process resume),
then resumes sharded to step 4 (checkpoint). The FSDP2 run also checkpoints its layers
(--activation-checkpointing) and takes the loss in chunks of 16 rows: the recomputations must
see gathered weights, and the result still equals the plain one-process run's."""

from __future__ import annotations

import functools
import shutil
import sys

import torch

from did_cli.core import diffusion
from did_cli.training import TrainConfig, setup
from did_cli.training.trainer import Trainer


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    units = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
    if mode == "fsdp1":
        from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        return FSDP(
            model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=units),
            backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
            use_orig_params=True,
            # sync_module_states (the yaml's) wants a GPU; every rank builds the same weights anyway
            limit_all_gathers=True,
            device_id=torch.device("cpu"),
        )
    from torch.distributed.fsdp import fully_shard

    for m in reversed(list(model.modules())):  # bottom-up, as Accelerate's fsdp2_prepare_model
        if type(m) in units:
            fully_shard(m, reshard_after_forward=True)
    fully_shard(model)
    return model


class ShardedTrainer(Trainer):
    mode = "fsdp1"

    def prepare(self) -> None:
        if self.mode == "ddp":  # Accelerate's own wrapping, as in production
            return super().prepare()
        self.model = wrap(self.model, self.mode)
        self.optimizer, self.scheduler = setup.make_optimizer(self.model, self.cfg, self.device)


def config(
    data: str, out: str, steps: int, batch: int, resume: bool = False, checkpointing: bool = False
) -> TrainConfig:
    return TrainConfig(
        data=data,
        out=out,
        steps=steps,
        batch_size=batch,
        lr=1e-3,
        warmup=2,
        ema=0.9,
        eval_every=0,
        eval_batches=1,
        save_every=2,
        log_every=1,
        block_sizes=[4, "L"],
        dropout=0.0,
        seed=3,
        resume=resume,
        activation_checkpointing=checkpointing,
        mixed_precision="no",
        compile=False,
        progress=False,
    )


def main(mode: str, data: str, out: str, copy: str) -> None:
    torch.set_num_threads(1)
    ShardedTrainer.mode = mode
    memory = mode == "fsdp2"
    if memory:
        diffusion.LOSS_CHUNK_ELEMENTS = 16 * 50258
    first = ShardedTrainer(config(data, out, 2, 4, checkpointing=memory)).setup()
    first.fit()
    if first.main:
        shutil.copytree(out, copy)
    first.accel.wait_for_everyone()
    ShardedTrainer(config(data, out, 4, 4, resume=True, checkpointing=memory)).setup().fit()


if __name__ == "__main__":
    main(*sys.argv[1:5])
