"""The model's configuration and presets, the diffusion schedule's settings, token ids, and the
parsers of list-valued options.

Each stage has its own settings dataclass beside its code (`training.TrainConfig`,
`sampling.DraftConfig` / `RefineConfig`, `QuickstartConfig`); the CLI builds them from its
options and a Python user builds them directly. `ModelConfig` reads and writes the BD3-LM
`config.json` keys, so public checkpoint folders load as-is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from did_cli.errors import UsageError

# GPT-2 BPE has 50257 tokens; BD3-LM appends [MASK] as id 50257, so V = 50258.
GPT2_VOCAB = 50257
MASK_ID = 50257
BOS_ID = 50256
EOS_ID = 50256


@dataclass
class ModelConfig:
    """The DiT backbone of BD3-LM (weight-compatible with its public checkpoints)."""

    vocab_size: int = GPT2_VOCAB + 1
    """Embedding rows, including the [MASK] token."""
    hidden_dim: int = 768
    """Model width."""
    n_layers: int = 12
    """Transformer layers (`n_blocks` in BD3-LM's config.json, which is what we write)."""
    n_heads: int = 12
    """Attention heads; head dim = hidden_dim / n_heads (rotary uses all of it)."""
    cond_dim: int = 128
    """Width of the (constant, sigma = 0) time embedding feeding adaLN."""
    mlp_ratio: int = 4
    """MLP width = mlp_ratio * hidden_dim (BD3-LM: 4)."""
    model_length: int = 1024
    """Sequence length L the model was trained for (the global block size)."""
    dropout: float = 0.1
    """Dropout on both residual branches (BD3-LM: 0.1); off in eval mode."""
    mask_id: int = MASK_ID
    """Id of [MASK]; its logit is suppressed before any softmax."""
    bos_id: int = BOS_ID
    """Id of BOS (= EOS for GPT-2); position 0 holds it and is never masked."""
    eos_id: int = EOS_ID
    """Id of EOS, the document separator."""
    tokenizer: str = "gpt2"
    """Tokenizer name or folder the model's ids refer to (checked against prepared data)."""

    def __post_init__(self) -> None:
        check_head_split(self.hidden_dim, self.n_heads, "hidden_dim", "n_heads")
        if not 0 <= self.mask_id < self.vocab_size:
            raise UsageError(f"mask_id {self.mask_id} outside vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """The config.json form: BD3-LM's key names."""
        d = dataclasses.asdict(self)
        d[JSON_KEYS["n_layers"]] = d.pop("n_layers")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from our config.json or a BD3-LM/MDLM one (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        renamed = {k: JSON_KEYS[k] for k in JSON_KEYS}
        kw = {k: v for k, v in d.items() if k in names and k not in renamed}
        kw.update({k: d[j] for k, j in renamed.items() if j in d})
        return cls(**kw)

    def n_params(self) -> int:
        """Parameter count of the backbone (matches `sum(p.numel())` of the module)."""
        d, V, c, m = self.hidden_dim, self.vocab_size, self.cond_dim, self.mlp_ratio * self.hidden_dim
        per_block = 2 * d + 3 * d * d + d * d + (d * m + m) + (m * d + d) + (6 * d * c + 6 * d)
        sigma = 256 * c + c + c * c + c
        out = d + (V * d + V) + (2 * d * c + 2 * d)
        return V * d + sigma + self.n_layers * per_block + out


def check_head_split(hidden: int, heads: int, hidden_name: str, heads_name: str) -> None:
    """The width must split into heads of an even width (rotary embeddings rotate pairs);
    UsageError naming the two settings (fields or flags) otherwise."""
    if hidden % heads:
        raise UsageError(f"{hidden_name} {hidden} is not divisible by {heads_name} {heads}")
    if (hidden // heads) % 2:
        raise UsageError(
            f"{hidden_name} {hidden} / {heads_name} {heads} = {hidden // heads}: the head width must be even "
            "(rotary embeddings)"
        )


# attribute -> config.json key where BD3-LM's name would mislead here ("blocks" are diffusion blocks)
JSON_KEYS = {"n_layers": "n_blocks"}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the quickstart: most parameters are the two 50258-row embeddings.
    "tiny": dict(hidden_dim=64, n_layers=2, n_heads=2, cond_dim=32, model_length=128),
    # The quickstart: sized so that ~8 minutes on 2 CPU cores reach a useful validation NELBO.
    "quick": dict(hidden_dim=128, n_layers=4, n_heads=4, cond_dim=64, model_length=128),
    # The paper's model: 12 x 768 x 12, ~169.6M parameters with untied embeddings.
    "small": dict(hidden_dim=768, n_layers=12, n_heads=12, cond_dim=128, model_length=1024),
    "medium": dict(hidden_dim=1024, n_layers=24, n_heads=16, cond_dim=128, model_length=1024),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a named preset, with field overrides (e.g. model_length=256)."""
    if name not in PRESETS:
        raise UsageError(f"unknown --preset {name!r}; choose from {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**kw)


@dataclass
class DiffusionConfig:
    """The masked-diffusion NELBO (SUBS parameterisation, linear schedule: mask prob = t)."""

    clip: tuple[float, float] = (0.0, 1.0)
    """t ~ U[beta, omega]; BD3-LM's clipped schedules narrow this per block size."""
    antithetic: bool = True
    """Low-discrepancy t: stratified over all (sequence, block) pairs of the batch."""
    eps: float = 1e-3
    """Lower bound on t so that the 1/t weight stays finite."""
    resample: bool = False
    """Redraw a block's mask until its masked fraction lies inside `clip` (BD3-LM's resampling)."""

    def __post_init__(self) -> None:
        lo, hi = self.clip
        if not (0.0 <= lo < hi <= 1.0):
            raise UsageError(f"--clip {lo},{hi}: need 0 <= beta < omega <= 1")


def parse_float_list(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise UsageError(f"{flag}: empty list")
    return vals


def parse_clip(text: str | None, flag: str = "--clip") -> tuple[float, float] | None:
    """'BETA,OMEGA' -> (beta, omega); 'none' -> None. Checks 0 < omega <= 1 and beta < omega."""
    if text is None or str(text).lower() in ("none", ""):
        return None
    vals = parse_float_list(text, flag)
    if len(vals) != 2:
        raise UsageError(f"{flag} {text!r}: expected BETA,OMEGA")
    lo, hi = vals
    if not (0.0 <= lo < hi <= 1.0) or hi <= 0.0:
        raise UsageError(f"{flag} {text!r}: need 0 <= beta < omega <= 1 (a range inside (0, 1])")
    return lo, hi


FULL_LENGTH = "L"
"""The block size that means the whole sequence (the global block), as options write it."""
LENGTH_WORDS = ("l", "length")
"""Spellings of `FULL_LENGTH` (any case) that every block-size option accepts."""


def parse_block_size(text: str | int, flag: str) -> int | str:
    """One block size as the options write it: an integer, or L / length (any case) for the
    whole sequence, returned as `FULL_LENGTH`. UsageError naming `flag` otherwise."""
    word = str(text).strip()
    if word.lower() in LENGTH_WORDS:
        return FULL_LENGTH
    try:
        return int(word)
    except ValueError:
        raise UsageError(f"{flag} {word!r}: a block size is an integer or L (the sequence length)") from None


def parse_block_sizes(text: str | list, flag: str = "--block-sizes") -> list[int | str]:
    """'4,L' (or a list of such items) -> [4, 'L']; see `parse_block_size`."""
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out = [parse_block_size(p, flag) for p in parts if str(p).strip()]
    if not out:
        raise UsageError(f"{flag}: empty list")
    return out


def resolve_block_size(size: int | str, length: int) -> int:
    """`FULL_LENGTH` -> the sequence length; integers unchanged."""
    return length if size == FULL_LENGTH else int(size)


def check_block_sizes(block_sizes: list[int], length: int, flag: str = "--block-sizes") -> None:
    for b in block_sizes:
        if b <= 0 or length % b:
            raise UsageError(f"{flag}: block size {b} does not divide the sequence length {length}")
