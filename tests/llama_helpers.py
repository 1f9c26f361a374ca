"""Tiny Llama-family diffusion models with random, non-trivial weights for the tests."""

from __future__ import annotations

import torch

from did_cli.core.llama import LlamaDiffusion
from did_cli.core.llama_config import LlamaConfig

SMALL = dict(
    vocab_size=98,
    source_vocab_size=97,
    hidden_dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    intermediate_size=48,
    rope_theta=10000.0,
    mask_id=97,
    bos_id=1,
    eos_id=2,
)
GPT2_VOCAB = dict(
    vocab_size=50258, source_vocab_size=50257, mask_id=50257, bos_id=50256, eos_id=50256, tokenizer="gpt2"
)


def tiny_llama(length: int = 16, seed: int = 0, std: float = 0.2, **overrides) -> LlamaDiffusion:
    """A small random model: weights N(0, std), norm weights around 1 (so that q/k norms and the
    final norm are not the identity)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMALL, "model_length": length, **overrides})
    model = LlamaDiffusion(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.eval()
