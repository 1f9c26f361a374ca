"""When a draft stops early: BD3-LM's entropy rule and variable length, and the guard against
non-finite logits. Evaluated after each block on the whole batch: `block_stops` reads the
verdict back at once (rows leave the batch), `DeferredEntropy` keeps it on the device and reads
it in batches (a batch of fixed shape, whose rows retire in place)."""

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
STATE_BYTES = 1 << 23
"""Generator states `DeferredEntropy` holds before it reads its verdicts back (a CPU generator's
state is 5 KB, a CUDA generator's 16 bytes: on CUDA one read per batch)."""


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


class DeferredEntropy:
    """The entropy rule of `block_stops` for a fixed-length batch, without a host read per block.

    After each block the check runs on the device and the first failing block of each row
    accumulates in a device tensor, while each checked row's generator state after that block
    is kept (a host-side copy, no sync). `settle` reads the verdicts back once: a checked row
    that failed is rewound to its state right after its first failing block and rejected,
    which is exactly where stopping at that block would have left it (its later draws are
    undone; its tokens are dropped anyway); an unchecked one is noted. Call `settle` when `due`
    says so: after the last block, or earlier when the kept states grow past `STATE_BYTES`."""

    def __init__(self, cfg: DraftConfig, rows: int, device: torch.device):
        self.min_entropy = cfg.min_entropy
        self.first = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.states: dict[int, list] = {}
        self.bytes = 0

    def observe(self, x: torch.Tensor, e: int, j: int, gens: list, checked: list[bool]) -> None:
        """Block j, which ends at e, was filled."""
        if not self.min_entropy or e <= ENTROPY_WINDOW:
            return
        fail = window_entropy(x[:, e - ENTROPY_WINDOW : e]) < self.min_entropy
        self.first = torch.where((self.first < 0) & fail, j, self.first)
        states = [g.get_state() if g is not None and c else None for g, c in zip(gens, checked)]
        self.states[j] = states
        self.bytes += sum(t.numel() for t in states if t is not None)

    def due(self, last: bool) -> bool:
        return bool(self.states) and (last or self.bytes >= STATE_BYTES)

    def settle(self, gens: list, checked: list[bool]) -> tuple[dict[int, int], set[int]]:
        """({row: REJECT} for checked rows that failed, rewound; unchecked rows that failed)."""
        first = self.first.tolist()  # the one host read
        stops: dict[int, int] = {}
        low: set[int] = set()
        for r, j in enumerate(first):
            if j < 0:
                continue
            if checked[r] and gens[r] is not None:
                gens[r].set_state(self.states[j][r])
                stops[r] = REJECT
            else:
                low.add(r)
        self.first.fill_(-1)
        self.states, self.bytes = {}, 0
        return stops, low


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
