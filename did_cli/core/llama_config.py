"""The configuration of the Llama-family backbone (`did_cli.core.llama`) and its rotary
frequencies.

One dataclass covers the decoder-only families we import (Llama, Qwen2, Qwen3): they differ in
switches (attention biases, q/k norms, tied embeddings, rope scaling), not in structure. Its
config.json form carries `"family": "llama"`; a config without a family key is the DiT's
`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from did_cli.errors import UsageError

FAMILY = "llama"
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    """A decoder-only Llama-style transformer used as a block-diffusion model.

    The defaults are SmolLM2-135M's shape (the model the project adapts), with [MASK] appended."""

    vocab_size: int = 49153
    """Embedding rows, including the [MASK] row when one was appended to the source's vocabulary."""
    source_vocab_size: int = 49152
    """Rows of the source model's embedding: ids at or above it were added here (the [MASK] row)."""
    hidden_dim: int = 576
    """Model width (the residual stream)."""
    n_layers: int = 30
    """Transformer layers."""
    n_heads: int = 9
    """Query heads."""
    n_kv_heads: int = 3
    """Key/value heads (grouped-query attention when fewer than n_heads); the KV cache holds these."""
    head_dim: int = 64
    """Width of one head; Qwen3 sets it apart from hidden_dim / n_heads."""
    intermediate_size: int = 1536
    """Width of the SwiGLU MLP."""
    rope_theta: float = 100000.0
    """Rotary base: the source model's positions mean nothing under another one."""
    rope_scaling: dict[str, Any] | None = None
    """None, or the source's Hugging Face rope dict ("linear" or "llama3" with their parameters),
    which rescales the rotary frequencies the model was trained with."""
    rms_eps: float = 1e-5
    """Epsilon of every RMSNorm (the source's value: the norms are part of its function)."""
    tie_embeddings: bool = True
    """Output layer shares the input embedding (SmolLM2, small Qwen models)."""
    attention_bias: bool = False
    """Biases on the q, k and v projections (Qwen2 has them)."""
    o_bias: bool = False
    """Bias on the attention output projection (Llama and Qwen3 with attention_bias set)."""
    qk_norm: bool = False
    """Per-head RMSNorm of q and k before rotary (Qwen3)."""
    model_length: int = 128
    """Sequence length L the diffusion model is trained for (the global block size)."""
    mask_id: int = 49152
    """Id of [MASK]; its logit is suppressed before any softmax, so it is never predicted."""
    bos_id: int = 0
    """Id placed at position 0 (never masked, never predicted)."""
    eos_id: int = 0
    """Id of EOS, the document separator."""
    tokenizer: str = ""
    """Tokenizer (hub name, folder or .gguf file) the ids refer to, checked against prepared data."""
    source: str = ""
    """The pretrained model this one was read or adapted from (as given to --from): `did eval-ppl`
    warns when it is asked to score this model's samples with it."""
    shift: bool = True
    """Next-token shift: row j's logits come from the state at j-1, as in the causal source model,
    so block size 1 is exactly the source; off, position j predicts itself (SDAR / dllm style)."""
    dropout: float = 0.0
    """Dropout on both residual branches (the source was trained without it)."""

    def __post_init__(self) -> None:
        if self.head_dim % 2:
            raise UsageError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise UsageError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not 0 < self.source_vocab_size <= self.vocab_size:
            raise UsageError(
                f"source_vocab_size {self.source_vocab_size} outside 1..vocab_size {self.vocab_size}"
            )
        for name in ("mask_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UsageError(f"{name} {getattr(self, name)} outside vocab_size {self.vocab_size}")
        rope_type(self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        """The config.json form, with `"family": "llama"` (the DiT's config has no family key)."""
        return {"family": FAMILY, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from `to_dict`'s form (unknown keys, e.g. a checkpoint's block sizes, ignored)."""
        if d.get("family", FAMILY) != FAMILY:
            raise UsageError(f"config family {d.get('family')!r} is not {FAMILY!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def n_params(self) -> int:
        """Parameter count (matches `sum(p.numel())` of `LlamaDiffusion`)."""
        d, dh, i = self.hidden_dim, self.head_dim, self.intermediate_size
        qkv = (self.n_heads + 2 * self.n_kv_heads) * dh
        attn = d * qkv + qkv * self.attention_bias + self.n_heads * dh * d + d * self.o_bias
        per_layer = 2 * d + attn + 2 * dh * self.qk_norm + 3 * d * i
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embed + d + self.n_layers * per_layer


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The rope type of a Hugging Face rope dict ('default' for None); others refused in one line."""
    if scaling is None:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UsageError(f"rope scaling type {kind!r} is not supported (only {', '.join(ROPE_TYPES[1:])})")
    need = {"linear": ("factor",), "llama3": LLAMA3_KEYS}.get(kind, ())
    missing = [k for k in need if k not in scaling]
    if missing:
        raise UsageError(f"rope scaling {kind!r} lacks {', '.join(missing)}")
    return kind


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] (float32), scaled as the source's rope dict says."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, s = rope_type(cfg.rope_scaling), cfg.rope_scaling or {}
    if kind == "linear":
        return inv / float(s["factor"])
    if kind == "llama3":
        # long wavelengths are slowed by `factor`, short ones kept, the band between blended
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(middle, blended, scaled)
    return inv
