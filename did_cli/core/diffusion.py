"""Masked diffusion per block: noise levels, corruption, and the NELBO loss.

Linear schedule: a token is masked with probability t; the SUBS parameterisation gives the
per-token loss -log p(x0 | x_t) on masked tokens only, weighted by 1/t (unmasked tokens are
copied through and contribute zero). One t per (sequence, block). The loss is averaged over
all non-BOS tokens of the batch, so it is the NELBO in nats per token.

Position 0 is never masked and never counted, whatever it holds: BOS in our default rows, the
first token of a raw window in BD3-LM's row layout (which restores x0 there after masking).

Resampling (BD3-LM's `training.resample`): with a clipped range [lo, hi] a block whose masked
fraction falls outside it is redrawn, with the same t, until it lies inside; the 1/t weight keeps
the drawn t. `allowed_counts` says which masked counts a block accepts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from did_cli.core.model_config import DiffusionConfig
from did_cli.errors import DidError, UsageError

# redraw rounds before giving up: each round accepts a block with probability >= ~0.3 for any
# range with an allowed count, so this is never reached unless no count is allowed
MAX_RESAMPLE_ROUNDS = 10_000


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


def allowed_counts(block_size: int, clip: tuple[float, float], eps: float = 1e-3) -> list[int]:
    """Masked counts k of a block of `block_size` tokens that resampling accepts under the range
    `clip` = (lo, hi): k / block_size in [lo, hi], bounds included. A low end <= eps (the
    unclipped 1e-3, or 0) bounds nothing below and a high end of 1 nothing above, as in BD3-LM."""
    lo, hi = clip
    tol = 1e-6  # float32 spellings of the bounds (0.45 -> 0.44999998) compare as the decimals
    return [
        k
        for k in range(block_size + 1)
        if (lo <= eps or k / block_size >= lo - tol) and (hi >= 1.0 or k / block_size <= hi + tol)
    ]


def resamples(clip: tuple[float, float] | None, eps: float = 1e-3) -> bool:
    """Whether a range clips anything that resampling would enforce."""
    return clip is not None and (clip[0] > eps or clip[1] < 1.0)


def check_resample(block_size: int, clip: tuple[float, float], flag: str = "--clip") -> None:
    """UsageError when no masked count of a block satisfies the range (resampling would never end)."""
    if resamples(clip) and not allowed_counts(block_size, clip):
        raise UsageError(
            f"{flag} {clip[0]:g},{clip[1]:g}: no number of masked tokens in a block of {block_size} has a "
            "fraction inside the range, so resampling cannot succeed; widen it or pass --no-resample"
        )


def _resample(
    masked: torch.Tensor,
    t_tok: torch.Tensor,
    block_size: int,
    clip: tuple[float, float],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Redraw every block whose masked count is not allowed under `clip` (all its tokens, same t)
    until each block is allowed; blocks already allowed keep their masks."""
    b, n = masked.shape
    ok = torch.zeros(block_size + 1, dtype=torch.bool, device=masked.device)
    allowed = allowed_counts(block_size, clip)
    if not allowed:
        raise DidError(f"t range {clip}: no masked count of a block of {block_size} is inside it")
    ok[allowed] = True
    for _ in range(MAX_RESAMPLE_ROUNDS):
        redo = ~ok[masked.view(b, n // block_size, block_size).sum(-1)]
        if not bool(redo.any()):
            return masked
        fresh = torch.rand(masked.shape, generator=generator, device=masked.device) < t_tok
        masked = torch.where(redo.repeat_interleave(block_size, dim=1), fresh, masked)
    raise DidError(f"resampling under t range {clip} did not converge in {MAX_RESAMPLE_ROUNDS} rounds")


def corrupt(
    x0: torch.Tensor,
    t_blocks: torch.Tensor,
    block_size: int,
    mask_id: int,
    generator: torch.Generator | None = None,
    resample: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token with the probability t of its block; position 0 never.

    `resample` = (lo, hi): redraw blocks whose masked fraction is outside the range (`_resample`).
    As in BD3-LM the fraction counts all tokens of the block, position 0 included, and position
    0 is unmasked afterwards. Returns x_t [B, L], the boolean mask of masked positions [B, L], and
    t per token [B, L]."""
    t_tok = t_blocks.repeat_interleave(block_size, dim=1)
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = u < t_tok
    if resamples(resample):
        masked = _resample(masked, t_tok, block_size, resample, generator)
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


LOSS_CHUNK_ELEMENTS = 1 << 27
"""Logits `token_nll` holds at once: [rows, V] goes through the output layer in row chunks of at
most this many elements (512 MiB in float32; L = 1024 training has ~100x more at batch 16)."""


def _rows_nll(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, mask_id: int
) -> torch.Tensor:
    return masked_token_loss(F.linear(h, weight, bias), targets, mask_id)


def token_nll(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask_id: int,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """`masked_token_loss` of the output layer (`weight` [V, D], `bias`) applied to h [N, D]:
    float32 [N], never holding more than `chunk_elements` logits (default LOSS_CHUNK_ELEMENTS).

    Up to that size it is exactly `masked_token_loss(F.linear(h, weight, bias), ...)`. Beyond,
    rows go in chunks, and under autograd each chunk is checkpointed: its logits, float32
    log-softmax and their gradients exist for one chunk at a time (the backward recomputes the
    chunk's output layer, about a third more output-layer work). The model calls this inside its
    forward, so no wrapper (Accelerate's float32 output conversion) sees [N, V] logits."""
    rows = max(1, (chunk_elements or LOSS_CHUNK_ELEMENTS) // weight.shape[0])
    if h.shape[0] <= rows:
        return _rows_nll(h, weight, bias, targets, mask_id)
    grad = torch.is_grad_enabled()
    parts = []
    for s in range(0, h.shape[0], rows):
        args = (h[s : s + rows], weight, bias, targets[s : s + rows], mask_id)
        parts.append(checkpoint(_rows_nll, *args, use_reentrant=False) if grad else _rows_nll(*args))
    return torch.cat(parts)


def masked_nll(
    model: torch.nn.Module, x0: torch.Tensor, masked: torch.Tensor, block_size: int, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pass over rows x0 [B, L] with `masked` [B, L] positions set to [MASK]:
    (flat indices of the masked positions into [B * L], their -log p(x0), unweighted, float32).
    One nonzero (one host sync) serves the model's gather, the targets and the count. The model
    computes the loss itself (`targets`), so its output is [N], never [N, V] logits."""
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    idx = masked.reshape(-1).nonzero().squeeze(1)
    return idx, model(xt, block_size, x0=x0, select=idx, targets=x0.reshape(-1)[idx])


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
    _, masked, t_tok = corrupt(
        torch.zeros((b * world, n), dtype=x0.dtype, device=x0.device),
        t,
        block_size,
        mask_id,
        generator,
        cfg.clip if cfg.resample else None,
    )
    masked, t_tok = masked[rank * b : (rank + 1) * b], t_tok[rank * b : (rank + 1) * b]
    n_tokens = b * (n - 1)
    idx, nll = masked_nll(model, x0, masked, block_size, mask_id)
    total = (nll / t_tok.reshape(-1)[idx]).sum()
    return LossOut(total / n_tokens, total.detach(), n_tokens, idx.numel())


@functools.lru_cache(maxsize=64)
def posterior_weights(n: int, t_range: tuple[float, float] = (1e-3, 1.0), grid: int = 20_000) -> torch.Tensor:
    """w[k] = E[1/t | k of n tokens masked], t ~ U[t_range] (float64, [n + 1], w[0] = 0).

    Our model never sees t (no time conditioning), so the loss of a mask pattern does not depend
    on t, and replacing the 1/t weight by its conditional mean given the block's masked count
    keeps the NELBO's expectation while removing most of its noise (the rare small t that
    carries a weight of hundreds). Integrals in log t on a fine grid."""
    lo, hi = t_range
    s = torch.linspace(math.log(lo), math.log(hi), grid, dtype=torch.float64)
    l1 = torch.log1p(-s.exp().clamp(max=1 - 1e-16))
    w = torch.zeros(n + 1, dtype=torch.float64)
    for k0 in range(1, n + 1, 128):  # chunks of k: a [128, grid] table at a time
        k = torch.arange(k0, min(k0 + 128, n + 1), dtype=torch.float64)[:, None]
        # over t: t^(k-1) (1-t)^(n-k) / t^k (1-t)^(n-k); dt = t ds
        w[k0 : k0 + len(k)] = (
            torch.logsumexp(k * s + (n - k) * l1, 1) - torch.logsumexp((k + 1) * s + (n - k) * l1, 1)
        ).exp()
    return w


def block_nll(
    model: torch.nn.Module,
    x0: torch.Tensor,
    t_blocks: torch.Tensor,
    block_size: int,
    mask_id: int,
    generator: torch.Generator | None = None,
    resample: tuple[float, float] | None = None,
    posterior: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Weighted NLL (weight times -log p at masked tokens, 0 elsewhere) summed per (row, block):
    [B, n_blocks] float32, for clean rows x0 [B, L] at noise levels t_blocks [B, n_blocks]. The
    weight is 1/t (BD3-LM's), or with `posterior` = the t range t was drawn from, E[1/t | the
    block's masked count] (`posterior_weights`; block 0 has one maskable token fewer)."""
    b, n = x0.shape
    nb = n // block_size
    _, masked, t_tok = corrupt(x0, t_blocks, block_size, mask_id, generator, resample)
    idx, per_tok = masked_nll(model, x0, masked, block_size, mask_id)
    if posterior is None:
        per_tok = per_tok / t_tok.reshape(-1)[idx]
    flat = torch.zeros(b * n, dtype=torch.float32, device=x0.device).index_add_(0, idx, per_tok.float())
    sums = flat.view(b, nb, block_size).sum(-1)
    if posterior is not None:
        k = masked.view(b, nb, block_size).sum(-1).cpu()
        w = posterior_weights(block_size, tuple(posterior))[k]
        w[:, 0] = posterior_weights(block_size - 1, tuple(posterior))[k[:, 0]]
        sums = sums * w.to(sums.device, torch.float32)
    return sums


# ----------------------------------------------------------------- the reported estimator

EVAL_T_RANGE = (1e-3, 1.0)
NELBO_WEIGHTS = ("posterior", "inverse-t")
MIN_T_PER_ROW = 2
"""Noise levels each row gets at least (draws x blocks): the global block, one t per row, draws
each row twice; smaller blocks already give a row many levels."""


def default_draws(n_blocks: int) -> int:
    """Noise draws per row: enough for `MIN_T_PER_ROW` t values (1 for blocks of <= L/2)."""
    return max(1, math.ceil(MIN_T_PER_ROW / n_blocks))


@dataclass
class NelboEstimate:
    nelbo: float
    """Mean NELBO in nats per (non-position-0) token."""
    se: float
    """Standard error: s.d. of the per-row figures / sqrt(rows) (rows and noise together)."""
    rows: int
    draws: int
    """Noise draws per row."""
    tokens: int
    """Tokens counted (rows x (L - 1)), each counted once however many draws."""
    per_row: torch.Tensor
    """Per-row NELBO [rows] (float64, CPU), the mean over the row's draws."""


def stratified_t(
    n: int, generator: torch.Generator, device: Any, t_range: tuple[float, float] = EVAL_T_RANGE
) -> torch.Tensor:
    """n noise levels, one in each of n equal strata of t_range, in a random order."""
    lo, hi = t_range
    u = (
        torch.randperm(n, generator=generator, device=device).double()
        + torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    ) / n
    return (lo + (hi - lo) * u).float()


@torch.no_grad()
def estimate_nelbo(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    block_size: int,
    mask_id: int,
    seed: int,
    draws: int | None = None,
    t_range: tuple[float, float] = EVAL_T_RANGE,
    weight: str = "posterior",
) -> NelboEstimate:
    """NELBO of clean row batches (each [b, L]) with its standard error.

    t is stratified over the whole set: its rows x draws x blocks levels take one value from
    each of as many strata of t_range (antithetic, as in training, but over every row rather
    than one batch), and the masks are drawn from the same seeded generator, so a fixed seed
    gives the same noise at every call (common random numbers for comparing checkpoints).
    `weight`: 'posterior' (E[1/t | masked count], same expectation, ~10x less variance) or
    'inverse-t' (BD3-LM's 1/t)."""
    if weight not in NELBO_WEIGHTS:
        raise UsageError(f"NELBO weight {weight!r}: choose from {', '.join(NELBO_WEIGHTS)}")
    post = tuple(t_range) if weight == "posterior" else None
    if not batches:
        raise DidError("no rows to estimate the NELBO on")
    dev = batches[0].device
    n = batches[0].shape[1]
    block_size = min(block_size, n)
    nb = n // block_size
    k = draws or default_draws(nb)
    total = sum(len(x) for x in batches)
    g = torch.Generator(device=dev).manual_seed(seed)
    t = stratified_t(total * k * nb, g, dev, t_range).view(total, k, nb)
    per_row = torch.empty((total, k), dtype=torch.float64)
    r0 = 0
    for x in batches:
        b = len(x)
        for d in range(k):
            nll = block_nll(model, x, t[r0 : r0 + b, d], block_size, mask_id, g, posterior=post)
            per_row[r0 : r0 + b, d] = nll.sum(1).double().cpu() / (n - 1)
        r0 += b
    rows = per_row.mean(1)
    se = float(rows.std(unbiased=True) / math.sqrt(total)) if total > 1 else float("nan")
    return NelboEstimate(float(rows.mean()), se, total, k, total * (n - 1), rows)
