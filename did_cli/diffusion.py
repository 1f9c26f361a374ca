"""Masked diffusion per block: noise levels, corruption, and the NELBO loss.

Linear schedule: a token is masked with probability t; the SUBS parameterisation gives the
per-token loss -log p(x0 | x_t) on masked tokens only, weighted by 1/t (unmasked tokens are
copied through and contribute zero). One t per (sequence, block). The loss is averaged over
all non-BOS tokens of the batch, so it is the NELBO in nats per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from did_cli.config import DiffusionConfig


def sample_t(
    batch: int,
    n_blocks: int,
    cfg: DiffusionConfig,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise levels [batch, n_blocks] in [max(beta, eps), omega].

    Antithetic (stratified) sampling: the batch's batch*n_blocks draws take one value from each
    of as many equal strata of [0, 1), assigned to (sequence, block) pairs by a random
    permutation, which lowers the variance of the batch loss without tying strata to positions."""
    m = batch * n_blocks
    u = torch.rand(m, generator=generator, device=device)
    if cfg.antithetic:
        perm = torch.randperm(m, generator=generator, device=device)
        u = (u + perm.to(u.dtype)) / m
    lo, hi = cfg.clip
    t = lo + (hi - lo) * u
    return t.clamp_min(cfg.eps).view(batch, n_blocks)


def corrupt(
    x0: torch.Tensor,
    t_blocks: torch.Tensor,
    block_size: int,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token with the probability t of its block; position 0 (BOS) never.

    Returns x_t [B, L], the boolean mask of masked positions [B, L], and t per token [B, L]."""
    t_tok = t_blocks.repeat_interleave(block_size, dim=1)
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = u < t_tok
    masked[:, 0] = False
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked, t_tok


@dataclass
class LossOut:
    loss: torch.Tensor
    """NELBO in nats per (non-BOS) token: the value to back-propagate."""
    nll_sum: torch.Tensor
    """Sum of weighted per-token losses (detached)."""
    n_tokens: int
    """Non-BOS tokens in the batch (the denominator)."""
    n_masked: int


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(target) with [MASK] excluded from the softmax (SUBS), in float32. logits [N, V]."""
    logits = logits.float()
    logits[:, mask_id] = float("-inf")
    return F.cross_entropy(logits, targets, reduction="none")


def nelbo(
    model: torch.nn.Module,
    x0: torch.Tensor,
    block_size: int,
    cfg: DiffusionConfig,
    mask_id: int,
    generator: torch.Generator | None = None,
    world: int = 1,
    rank: int = 0,
) -> LossOut:
    """The vectorised block-diffusion NELBO of clean rows x0 [B, L] (position 0 = BOS).

    One forward of `model` (the DiT, or a DDP/FSDP wrapper of it) over `[x_t ; x_0]`, logits
    computed only at masked positions of the noisy half. The model is called even when nothing
    is masked (the loss is then an exact zero), so DDP/FSDP always see every parameter use.

    With `world` > 1, x0 is process `rank`'s slice of a global batch of world x B rows: t and
    the masking noise are drawn for the whole global batch from an identically seeded
    `generator` and sliced, so each row gets the same noise whatever the process count and N
    processes with batch B train like one process with batch N x B."""
    b, n = x0.shape
    block_size = min(block_size, n)
    t = sample_t(b * world, n // block_size, cfg, x0.device, generator)
    _, masked, t_tok = corrupt(torch.zeros((b * world, n), dtype=x0.dtype, device=x0.device), t, block_size, mask_id, generator)
    masked, t_tok = masked[rank * b:(rank + 1) * b], t_tok[rank * b:(rank + 1) * b]
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    n_tokens = b * (n - 1)
    # one nonzero (one host sync) serves the model's gather, the targets and the count
    idx = masked.reshape(-1).nonzero().squeeze(1)
    logits = model(xt, block_size, x0=x0, select=idx)
    per_tok = masked_token_loss(logits, x0.reshape(-1)[idx], mask_id) / t_tok.reshape(-1)[idx]
    total = per_tok.sum()
    return LossOut(total / n_tokens, total.detach(), n_tokens, idx.numel())


def nelbo_loop_reference(
    model: torch.nn.Module, x0: torch.Tensor, xt: torch.Tensor, t_tok: torch.Tensor, block_size: int, mask_id: int
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
    """Test NELBO of clean rows [B, L]: (sum of nats, number of non-BOS tokens), with
    t ~ U[t_range] drawn independently per block (plain Monte Carlo, as BD3-LM's evaluation)."""
    cfg = DiffusionConfig(clip=t_range, antithetic=False, eps=t_range[0])
    out = nelbo(model, rows, block_size, cfg, mask_id, generator)
    return float(out.nll_sum), out.n_tokens
