"""BD3-LM's data-driven clipped schedule (`--clip auto`).

The candidates are a grid (`clip_grid`): the unclipped (1e-3, 1), then for each width w the
ranges [i, i + w] for i = 0, delta, 2 delta, ..., 1 - w (a low end of 0 becomes 1e-3). Each
candidate is scored on validation batches by the loss it would train with (its t range, and
resampling when the run resamples): per batch, the unbiased variance of the per-(sequence,
block) means of the weighted per-token NLL (`batch_statistic`), summed over the batches. The
lowest sum wins; on a tie the earlier candidate in grid order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from did_cli.core.model_config import DiffusionConfig
from did_cli.io.terminal import seconds_text

EPS = 1e-3
FULL = (EPS, 1.0)


def clip_grid(
    widths=(0.5, 0.6, 0.7, 0.8, 0.9), delta: float = 0.05, eps: float = EPS
) -> list[tuple[float, float]]:
    """The candidate ranges, in tie-break order: (eps, 1) first, then width by width."""
    grid = [(eps, 1.0)]
    for w in widths:
        if not 0.0 < w <= 1.0 or not delta > 0:
            raise ValueError(f"clip search: width {w} / delta {delta} outside (0, 1] / (0, inf)")
        for k in range(int(math.floor((1.0 - w) / delta + 1e-6)) + 1):
            lo = round(k * delta, 9)
            cand = (max(lo, eps), min(round(lo + w, 9), 1.0))
            if cand not in grid:
                grid.append(cand)
    return grid


def batch_statistic(block_nll_sums: torch.Tensor, block_size: int) -> float:
    """Unbiased variance over all (sequence, block) means of one batch; `block_nll_sums` is
    [batch, n_blocks], each block's summed weighted NLL (its mean divides by all its tokens)."""
    means = (block_nll_sums.double() / block_size).reshape(-1)
    return float(means.var(unbiased=True)) if means.numel() > 1 else 0.0


def pick(scores: dict[str, float]) -> str:
    """The key with the lowest score; the first one on a tie (dict order = grid order)."""
    best = None
    for key, v in scores.items():
        if best is None or v < scores[best]:
            best = key
    return best


def key_of(cand: tuple[float, float]) -> str:
    return f"{cand[0]:g},{cand[1]:g}"


@torch.no_grad()
def search_clip(
    model,
    batches: list[torch.Tensor],
    block_size: int,
    mask_id: int,
    seed: int,
    grid: list[tuple[float, float]] | None = None,
    resample: bool = True,
    report: Callable[[str], None] | None = None,
) -> tuple[tuple[float, float], dict[str, float]]:
    """Score every candidate of `grid` on `batches`; returns (winner, {"lo,hi": score}).

    Every candidate sees the same seeded noise (common random numbers: the comparison between
    candidates does not carry the noise of separate draws). Candidates that allow no masked
    count of a block under resampling are left out. `report` gets progress lines with an
    estimate of the time left (`SearchProgress`)."""
    from did_cli.core.diffusion import allowed_counts, block_nll, resamples, sample_t

    scores: dict[str, float] = {}
    chosen = {}
    todo = [
        c
        for c in grid or clip_grid()
        if not (resample and resamples(c) and not allowed_counts(block_size, c))
    ]
    progress = SearchProgress(len(todo), len(batches), block_size, report)
    for cand in todo:
        g = torch.Generator(device=batches[0].device).manual_seed(seed)
        dcfg = DiffusionConfig(clip=cand, antithetic=True)
        total = 0.0
        for x in batches:
            b, n = x.shape
            bs = min(block_size, n)
            t = sample_t(b, n // bs, dcfg, x.device, g)
            total += batch_statistic(block_nll(model, x, t, bs, mask_id, g, cand if resample else None), bs)
        scores[key_of(cand)] = total
        chosen[key_of(cand)] = cand
        progress.done_one()
    progress.finish()
    return chosen[pick(scores)], scores


class SearchProgress:
    """Progress lines of one clip search: after the first candidate (with the estimate for
    all of them), then at most every `every` seconds, and a last line with the time it took;
    nothing for a search shorter than `quiet` seconds."""

    def __init__(self, total: int, batches: int, block_size: int, report, every: float = 30.0, quiet=10.0):
        self.total, self.batches, self.block = total, batches, block_size
        self.report, self.every, self.quiet = report, every, quiet
        self.t0 = self.last = time.perf_counter()
        self.n = 0

    def done_one(self) -> None:
        self.n += 1
        now = time.perf_counter()
        spent = now - self.t0
        if self.report is None or self.n == self.total or spent * self.total / self.n < self.quiet:
            return
        if self.n > 1 and now - self.last < self.every:
            return
        self.last = now
        left = spent / self.n * (self.total - self.n)
        self.report(
            f"clip search (block {self.block}): candidate {self.n}/{self.total} x {self.batches} batches, "
            f"{seconds_text(spent)} so far, about {seconds_text(left)} left"
        )

    def finish(self) -> None:
        spent = time.perf_counter() - self.t0
        if self.report is not None and spent >= self.quiet:
            self.report(
                f"clip search (block {self.block}): {self.total} candidates x {self.batches} batches in "
                f"{seconds_text(spent)}"
            )
