"""Post-hoc confidences for refinement: re-read finished sequences with full attention when the
records carry no snapshot confidence (`did refine --confidence posthoc | posthoc-loo`).

These scoring passes are forward passes, not denoising steps: callers count them apart from NFE.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def log_prob_of(logits: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """p(target) under raw logits [N, V] with [MASK] suppressed, in float64."""
    lg = logits.to(torch.float64)
    lg[:, mask_id] = -math.inf
    return (lg.gather(1, targets[:, None])[:, 0] - lg.logsumexp(dim=1)).exp()


def posthoc_confidence(
    model: Any,
    x: torch.Tensor,
    ranges: list[tuple[int, int]],
    leave_one_out: bool,
    rows_per_call: int,
    passes: Any = None,
) -> tuple[torch.Tensor, int]:
    """Confidences [b, n] (float64) of finished sequences x and the number of forward passes.

    - plain: one global pass over x as it is, p(x_i | x) at every position (the model sees x_i
      itself, which SUBS training never asks it to predict); with `passes` (a
      `passes.RefinePasses`) the output layer runs row by row, so only one [n, V] float64 copy is
      alive at a time;
    - leave one out: p(x_i | x with x_i masked) at each generated position [lo, hi) of each row,
      from copies of the rows with one position masked, `rows_per_call` copies per pass."""
    b, n = x.shape
    mask_id = model.config.mask_id
    if not leave_one_out:
        if passes is not None:
            h, _ = passes.global_hidden(x)
        logits = None if passes is not None else model(x)
        conf = torch.empty((b, n), dtype=torch.float64, device=x.device)
        for i in range(b):
            conf[i] = log_prob_of(passes.head(h[i]) if passes is not None else logits[i], x[i], mask_id)
        return conf, 1
    conf = torch.full((b, n), math.nan, dtype=torch.float64, device=x.device)
    pairs = torch.tensor(
        [(i, p) for i, (lo, hi) in enumerate(ranges) for p in range(lo, hi)], dtype=torch.long
    ).reshape(-1, 2)
    per = max(1, rows_per_call)
    calls = 0
    for c in range(0, len(pairs), per):
        ri, pi = pairs[c : c + per].to(x.device).unbind(1)
        k = torch.arange(len(ri), device=x.device)
        xx = x[ri].clone()
        xx[k, pi] = mask_id
        sel = torch.zeros(xx.shape, dtype=torch.bool, device=x.device)
        sel[k, pi] = True
        conf[ri, pi] = log_prob_of(model(xx, None, select=sel), x[ri, pi], mask_id)
        calls += 1
    return conf, calls
