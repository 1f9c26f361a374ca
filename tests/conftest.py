"""Shared fixtures: tiny models and the golden folder beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden" / "bd3lm_tiny"


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI run without the golden folder {GOLDEN}")
        pytest.skip(f"golden outputs not found at {GOLDEN} (they sit beside the repo, not in it)")
    return GOLDEN


def tiny_model(length: int = 64, seed: int = 0, std: float = 0.05, **overrides):
    """A tiny DiT with random, non-trivial weights (BD3-LM zero-inits adaLN and the output)."""
    from did_cli.core.dit import DiT
    from did_cli.core.model_config import preset

    torch.manual_seed(seed)
    model = DiT(preset("tiny", model_length=length, dropout=0.0, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        model.rotary_emb.inv_freq.copy_(
            1.0 / (10000 ** (torch.arange(0, model.config.head_dim, 2).float() / model.config.head_dim))
        )
    return model.eval()


@pytest.fixture(scope="session")
def tok():
    """The bundled GPT-2 tokenizer (loaded once per test session)."""
    from did_cli.io.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture
def tiny():
    return tiny_model()
