"""`AdaptConfig`: the settings of `did adapt`, a `TrainConfig` whose model comes from a pretrained
causal LM, with defaults for a model that already knows the language (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from did_cli.errors import UsageError
from did_cli.training.train_config import TrainConfig, check_train_config


@dataclass
class AdaptConfig(TrainConfig):
    """A training run that starts from a pretrained causal LM (`did adapt`)."""

    source: str = ""
    """The causal LM to adapt: a Hugging Face folder (config.json + safetensors; Llama, Qwen2 or
    Qwen3), a .gguf file, or a hub name (fetched only when the hub is reachable)."""
    shift: bool = True
    """Keep the next-token shift: position j is predicted from the state at j-1, as the source
    model predicts, so block size 1 is exactly the source at step 0 (Fast-dLLM v2, DiffuGPT,
    Dream); --no-shift makes position j predict itself (SDAR, dllm)."""
    lr: float = 1e-4
    """Peak AdamW learning rate (constant after warm-up). 1e-4: the source already knows the
    language, and 3e-4 (from scratch) erodes what it knows before the diffusion task is learned."""
    warmup: int = 50
    """Linear warm-up steps. Short: the weights are trained already, the warm-up only lets AdamW's
    moment estimates settle (its first updates are lr-sized whatever the gradient)."""
    batch_size: int = 8
    """Sequences per process per micro-batch (global batch = batch_size x grad_accum x
    processes). 8: a 135M-parameter model's 2L pass at L = 128 is seconds per row on a CPU; raise
    it (or --grad-accum) on a GPU."""
    eval_every: int = 250
    """Validation every N steps (0 = only at the end); adaptation runs are short."""
    save_every: int = 250
    """Checkpoint every N steps (also at the end, on a new best, and on Ctrl-C)."""


def check_adapt_config(cfg: AdaptConfig) -> None:
    """Eager checks of the settings alone (the source and the data are checked when loaded)."""
    if not cfg.source:
        raise UsageError("--from is required (a model folder, a .gguf file or a hub name)")
    if cfg.init:
        raise UsageError("--init: an adapted model starts from --from")
    check_train_config(cfg)
