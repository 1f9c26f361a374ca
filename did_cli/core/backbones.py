"""The two backbone families behind one door: a config from its config.json form, and a fresh
model from a config. A config.json with `"family": "llama"` is the Llama-family decoder
(`did_cli.core.llama`); one without a family key is the BD3-LM DiT (`did_cli.core.dit`)."""

from __future__ import annotations

from typing import Any

from did_cli.core.dit import DiT
from did_cli.core.llama import LlamaDiffusion
from did_cli.core.llama_config import FAMILY, LlamaConfig
from did_cli.core.model_config import ModelConfig
from did_cli.errors import UsageError


def family_of(d: dict[str, Any]) -> str:
    """'llama' or 'dit' for a model's config.json form (`d.get("model", d)` for a run's)."""
    fam = d.get("family")
    if fam is None:
        return "dit"
    if fam != FAMILY:
        raise UsageError(f"unknown model family {fam!r} (known: {FAMILY}, or no family key for the DiT)")
    return fam


def config_from_dict(d: dict[str, Any]) -> ModelConfig | LlamaConfig:
    """The config object of either family from its config.json form."""
    return LlamaConfig.from_dict(d) if family_of(d) == FAMILY else ModelConfig.from_dict(d)


def build_backbone(cfg: ModelConfig | LlamaConfig) -> DiT | LlamaDiffusion:
    """A freshly initialised model of the config's family (e.g. the EMA copy of a model)."""
    return LlamaDiffusion(cfg) if isinstance(cfg, LlamaConfig) else DiT(cfg)
