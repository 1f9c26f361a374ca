"""BD3-LM's data-driven clipped schedule (`--clip auto`): the t range whose per-batch training
loss varies least over the validation batches."""

from __future__ import annotations

import torch

from did_cli.config import DiffusionConfig

# BD3-LM-style candidate ranges for the data-driven clipped schedule (`clip="auto"`).
CLIP_CANDIDATES: tuple[tuple[float, float], ...] = (
    (0.0, 1.0), (0.1, 0.9), (0.2, 0.8), (0.3, 0.8), (0.45, 0.95), (0.5, 1.0), (0.3, 1.0), (0.6, 0.9),
)


@torch.no_grad()
def search_clip(model, batches: list[torch.Tensor], block_size: int, mask_id: int, seed: int,
                candidates=CLIP_CANDIDATES) -> tuple[tuple[float, float], dict[str, float]]:
    """BD3-LM's data-driven clipped schedule: the candidate t range whose per-batch training loss
    (t ~ U[beta, omega], antithetic, same fixed seed for every candidate) varies least across
    the validation batches. Returns (best range, {"beta,omega": variance})."""
    from did_cli.diffusion import nelbo

    variances = {}
    for cand in candidates:
        g = torch.Generator(device=batches[0].device).manual_seed(seed)
        dcfg = DiffusionConfig(clip=tuple(cand), antithetic=True)
        vals = torch.tensor([float(nelbo(model, x, block_size, dcfg, mask_id, g).loss) for x in batches], dtype=torch.float64)
        variances[f"{cand[0]:g},{cand[1]:g}"] = float(vals.var(unbiased=True)) if len(vals) > 1 else float("inf")
    key = min(variances, key=lambda k: (variances[k], k))
    lo, hi = (float(v) for v in key.split(","))
    return (lo, hi), variances
