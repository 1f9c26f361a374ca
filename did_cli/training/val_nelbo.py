"""Validation NELBO during training: the bound on fixed held-out batches at fixed noise, so that
evaluations of one run are comparable with each other."""

from __future__ import annotations

import torch

EVAL_T_RANGE = (1e-3, 1.0)


@torch.no_grad()
def val_nelbo(model, batches: list[torch.Tensor], block_size: int, mask_id: int, seed: int) -> float:
    """NELBO (nats/token) of fixed validation batches with fixed-seed t ~ U[1e-3, 1]."""
    from did_cli.diffusion import eval_nelbo

    dev = batches[0].device
    g = torch.Generator(device=dev).manual_seed(seed)
    total, count = 0.0, 0
    for x in batches:
        s, n = eval_nelbo(model, x, block_size, mask_id, EVAL_T_RANGE, g)
        total, count = total + s, count + n
    return total / max(count, 1)
