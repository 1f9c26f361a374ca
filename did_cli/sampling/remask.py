"""The re-mask rule of Diffusion in Diffusion: which tokens a refinement stage regenerates.

A stage with ratio g re-masks ceil(g x the number of free positions) tokens of a sample, where
free means generated (BOS, a prompt and a suffix are fixed and never re-masked). `snapshot` and
`posthoc` confidence pick the free positions of lowest confidence (ties go to the lower
position, so the choice is deterministic); `random` picks them uniformly from a seeded
generator. This function is the whole rule: `did refine` calls it once per record and stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from did_cli.sampling.sampler_config import CONFIDENCES


def remask_count(ratio: float, free: int) -> int:
    """How many of `free` positions a stage of ratio `ratio` re-masks: ceil(ratio x free), with
    a float tolerance so that 0.25 x 8 is 2, not 3."""
    return max(0, min(free, math.ceil(ratio * free - 1e-9)))


def remask_positions(
    confidence: Sequence[float],
    ratio: float,
    fixed: Sequence[bool],
    mode: str = "snapshot",
    generator: torch.Generator | None = None,
) -> list[int]:
    """The positions to re-mask, ascending.

    `confidence[p]`: the probability the model gave token p when it was committed (snapshot) or
    when re-scored (posthoc); `fixed[p]`: True where token p may never change. `mode` 'random'
    ignores the confidences and draws from `generator` (a CPU generator; a permutation of the
    free positions, so the same seed picks the same tokens on every device)."""
    if mode not in CONFIDENCES:
        raise ValueError(f"unknown confidence mode {mode!r}")
    free = [p for p, f in enumerate(fixed) if not f]
    k = remask_count(ratio, len(free))
    if k == 0:
        return []
    if mode == "random":
        perm = torch.randperm(len(free), generator=generator)[:k]
        return sorted(free[int(i)] for i in perm)
    order = sorted(free, key=lambda p: (confidence[p], p))
    return sorted(order[:k])


__all__ = ["remask_count", "remask_positions"]
