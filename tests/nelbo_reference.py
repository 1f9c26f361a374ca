"""Slow reference computations the tests check the vectorised loss against (not product code)."""

from __future__ import annotations

import torch

from did_cli.core.diffusion import masked_token_loss, nelbo
from did_cli.core.model_config import DiffusionConfig


def nelbo_loop_reference(
    model: torch.nn.Module,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t_tok: torch.Tensor,
    block_size: int,
    mask_id: int,
) -> torch.Tensor:
    """The same loss computed block by block (each block denoised from its own noisy tokens and
    the clean earlier blocks, through the sampling pass). Slow; for tests."""
    b, n = x0.shape
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, n, block_size):
        end = start + block_size
        inp = torch.cat([x0[:, :start], xt[:, start:end]], dim=1)
        logits = model(inp, block_size)[:, start:end]
        m = xt[:, start:end] == mask_id
        if m.any():
            lt = masked_token_loss(logits[m], x0[:, start:end][m], mask_id)
            total = total + (lt / t_tok[:, start:end][m]).sum()
    return total / (b * (n - 1))


@torch.no_grad()
def eval_nelbo(
    model: torch.nn.Module,
    rows: torch.Tensor,
    block_size: int,
    mask_id: int,
    t_range: tuple[float, float] = (1e-3, 1.0),
    generator: torch.Generator | None = None,
) -> tuple[float, int]:
    """NELBO of clean rows [B, L] with one plain Monte Carlo t ~ U[t_range] per block: (sum of
    nats, number of non-BOS tokens). One draw, no standard error: `estimate_nelbo` is the
    estimator the commands report."""
    cfg = DiffusionConfig(clip=t_range, antithetic=False, eps=t_range[0])
    out = nelbo(model, rows, block_size, cfg, mask_id, generator)
    return float(out.nll_sum), out.n_tokens
