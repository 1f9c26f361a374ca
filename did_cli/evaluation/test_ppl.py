"""Test perplexity of a diffusion checkpoint: the NELBO bound on a prepared split."""

from __future__ import annotations

import math

import torch

from did_cli.checkpoint import load_model, resolve_checkpoint
from did_cli.data import PreparedData
from did_cli.diffusion import eval_nelbo
from did_cli.errors import DidError, UsageError
from did_cli.util import resolve_device


def test_ppl(
    model_path: str,
    data_dir: str,
    block_size: int | None = None,
    split: str = "validation",
    batch_size: int = 8,
    device: str | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> dict:
    """Test perplexity (the NELBO bound) of a diffusion checkpoint on a prepared split.

    t ~ U[1e-3, 1] with one t per block, the checkpoint's EMA weights (model.safetensors),
    BOS excluded from the token count. `block_size` defaults to the model's length (MDLM bound);
    `model_path` may be a checkpoint folder or a run folder (its latest checkpoint).
    Returns {nelbo, ppl, bits_per_token, tokens, rows, block_size, split, model}."""
    ckpt = resolve_checkpoint(model_path)
    data = PreparedData(data_dir)
    model, _ = load_model(ckpt, device=resolve_device(device))
    dev = next(model.parameters()).device
    cfg = model.config
    data.check_compatible(tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, seq_len=cfg.model_length)
    bs = block_size or cfg.model_length
    if bs <= 0 or cfg.model_length % bs:
        raise UsageError(f"--block-size {bs} does not divide the model length {cfg.model_length}")
    rows = data.rows(split)
    if len(rows) == 0:
        raise DidError(f"{data_dir}: split {split!r} has no rows")
    if max_rows:
        rows = rows[:max_rows]
    gen = torch.Generator(device=dev).manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = torch.as_tensor(rows[i : i + batch_size].astype("int64"), device=dev)
        s, n = eval_nelbo(model, batch, bs, cfg.mask_id, generator=gen)
        total, count = total + s, count + n
    nelbo = total / count
    return {
        "nelbo": nelbo,
        "ppl": math.exp(nelbo),
        "bits_per_token": nelbo / math.log(2),
        "tokens": count,
        "rows": len(rows),
        "block_size": bs,
        "split": split,
        "model": str(ckpt),
    }


# pytest would collect a module-level `test_*` function imported into a test file
test_ppl.__test__ = False  # type: ignore[attr-defined]
