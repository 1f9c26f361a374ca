"""When a draft stops early: BD3-LM's entropy rule and variable length, and the guard against
non-finite logits. Evaluated after each block on the whole batch."""

from __future__ import annotations

import math
from typing import Any

import torch

from did_cli.errors import DidError
from did_cli.sampling.sampler_config import ENTROPY_WINDOW, DraftConfig


def window_entropy(x: torch.Tensor) -> torch.Tensor:
    """Unigram entropy (nats, float64) of each row of token ids x [b, n]."""
    srt = x.sort(dim=1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    counts = torch.zeros(x.shape, dtype=torch.float64, device=x.device).scatter_add_(
        1, new.long().cumsum(1) - 1, torch.ones(x.shape, dtype=torch.float64, device=x.device)
    )
    p = counts / x.shape[1]
    return -(p * p.clamp_min(1e-300).log()).sum(dim=1)


REJECT = -1


def block_stops(
    cfg: DraftConfig, mc: Any, x: torch.Tensor, is_gen: torch.Tensor, s: int, e: int, checked: list[bool]
) -> tuple[dict[int, int], set[int], set[int]]:
    """Which batch rows stop after block [s, e): ({row: tokens kept, or REJECT}, rows cut by the
    entropy rule, rows that failed an unenforced check). One host sync when a rule applies."""
    stops: dict[int, int] = {}
    cut: set[int] = set()
    low: set[int] = set()
    if cfg.var_length:
        gen = (x[:, s:e] == mc.eos_id) & is_gen[:, s:e]  # an EOS in a prompt does not end it
        hit = gen.any(dim=1).tolist()
        if any(hit):
            firsts = gen.int().argmax(dim=1).tolist()
            stops = {r: s + firsts[r] + 1 for r, h in enumerate(hit) if h}
    if cfg.min_entropy and e > ENTROPY_WINDOW:
        fail = (window_entropy(x[:, e - ENTROPY_WINDOW : e]) < cfg.min_entropy).tolist()
        for r, f in enumerate(fail):
            if not f:
                continue
            if cfg.var_length:  # BD3-LM: drop the last 256 tokens (over an EOS in this block too)
                stops[r] = e - ENTROPY_WINDOW
                cut.add(r)
            elif checked[r]:
                stops[r] = REJECT
            else:
                low.add(r)
    return stops, cut, low


def check_finite_conf(what: str, conf: list, lo: int, hi: int, block: int | None = None) -> None:
    """A committed position whose probability is NaN or inf means the model's logits were not
    finite there (damaged weights, an overflow): stop naming the sample, position and block."""
    for p in range(lo, hi):
        c = conf[p]
        if c is not None and not math.isfinite(c):
            where = f" (block {p // block} of size {block})" if block else ""
            raise DidError(
                f"{what}: the model gave non-finite logits at position {p}{where}; the weights or "
                "the precision (--dtype) are at fault"
            )
