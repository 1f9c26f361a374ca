"""Test perplexity of a diffusion checkpoint: the NELBO bound on a prepared split."""

from __future__ import annotations

import math

import torch

from did_cli.core.diffusion import estimate_nelbo
from did_cli.errors import DidError, UsageError
from did_cli.io.checkpoint import resolve_checkpoint
from did_cli.io.data import PreparedData, check_token_ids
from did_cli.io.model_folder import load_model
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
    draws: int | None = None,
    weight: str = "posterior",
) -> dict:
    """Test perplexity (the NELBO bound) of a diffusion checkpoint on a prepared split, with its
    standard error.

    t in [1e-3, 1], one per (row, draw, block), stratified over the whole split
    (`did_cli.core.diffusion.estimate_nelbo`); `draws` noise draws per row (default: enough for 2
    noise levels per row); `weight` 'posterior' (E[1/t | masked count]) or 'inverse-t' (1/t).
    The checkpoint's EMA weights (model.safetensors); position 0 is neither masked nor counted.
    `block_size` defaults to the model's length (MDLM bound);
    `model_path` may be a checkpoint folder or a run folder (its latest checkpoint).
    Returns {nelbo, nelbo_se, ppl, ppl_ci95, bits_per_token, tokens, rows, draws, weight,
    block_size, split, row_layout, model}."""
    ckpt = resolve_checkpoint(model_path)
    data = PreparedData(data_dir)
    model, _ = load_model(ckpt, device=resolve_device(device))
    dev = next(model.parameters()).device
    cfg = model.config
    data.check_compatible(tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, seq_len=cfg.model_length)
    bs = block_size or cfg.model_length
    if bs <= 0 or cfg.model_length % bs:
        raise UsageError(f"--block-size {bs} does not divide the model length {cfg.model_length}")
    if draws is not None and draws < 1:
        raise UsageError(f"--draws {draws}: must be >= 1")
    check_token_ids(data, cfg.vocab_size, (split,))
    rows = data.rows(split)
    if len(rows) == 0:
        raise DidError(f"{data_dir}: split {split!r} has no rows")
    if max_rows:
        rows = rows[:max_rows]
    batches = [
        torch.as_tensor(rows[i : i + batch_size].astype("int64"), device=dev)
        for i in range(0, len(rows), batch_size)
    ]
    est = estimate_nelbo(model, batches, bs, cfg.mask_id, seed, draws, weight=weight)
    se = est.se if math.isfinite(est.se) else None
    return {
        "nelbo": est.nelbo,
        "nelbo_se": se,
        "ppl": math.exp(est.nelbo),
        "ppl_ci95": [math.exp(est.nelbo - 1.96 * se), math.exp(est.nelbo + 1.96 * se)]
        if se is not None
        else None,
        "bits_per_token": est.nelbo / math.log(2),
        "tokens": est.tokens,
        "rows": est.rows,
        "draws": est.draws,
        "weight": weight,
        "block_size": bs,
        "split": split,
        "row_layout": data.meta.get("row_layout", "bos"),
        "model": str(ckpt),
    }


# pytest would collect a module-level `test_*` function imported into a test file
test_ppl.__test__ = False  # type: ignore[attr-defined]
