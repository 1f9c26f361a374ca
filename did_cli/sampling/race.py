"""The noise of the sampler: Gumbel-max as an exponential race, drawn lazily.

Gumbel-max picks argmax_i (log p_i + G_i) with G_i = -log E_i and E_i iid Exp(1): the token whose
exponential clock E_i / p_i rings first (BD3-LM writes it argmax p_i / E_i). Drawing E_i for
every kept token costs one float64 random number and two logarithms per token, more than the
row's logits on a CPU. So the clocks of all V tokens are defined by a few numbers per row:

- a Poisson process of rate V (all tokens together): NOISE_ARRIVALS arrival times
  T_1 <= ... <= T_c (cumulative sums of Exp(1) / V), each labelled with a token id uniform over
  the vocabulary. A token's clock E_i is the time of the first arrival labelled i;
- a token with no arrival among the c has E_i = T_c + Y_i, with Y_i = -log(1 - h_i) where h_i is
  a 53-bit hash of (the row's key, i): after T_c every token's process starts afresh (an
  exponential has no memory), so Y_i is Exp(1), independent of everything else.

These E_i are iid Exp(1) (the superposition of V independent rate-1 processes is this labelled
process), so the winner is an exact draw from the kept set's distribution, in float64. A row's
noise is the fixed-size uniform draw `NOISE_WIDTH` wide that `draw_noise` makes from its
sample's generator, so draws never depend on the logits, the batch or the chunking.

Only a few clocks are ever computed: a kept token that had no arrival has E_i > T_c, so it can
beat the best labelled kept token only when log p_i - log T_c >= that score; `winner` evaluates
exactly those tokens and the labelled ones. `full_scores` evaluates every token (the definition,
and the path that needs no host read)."""

from __future__ import annotations

from typing import NamedTuple

import torch

NOISE_ARRIVALS = 128
"""Arrivals of the race drawn per row (the labelled clocks)."""
NOISE_WIDTH = 2 * NOISE_ARRIVALS + 2
"""Uniforms drawn per row: arrival gaps, arrival labels, two 31-bit hash keys."""
MARGIN = 1e-9
"""Absolute slack (in log units) that keeps pruning safe from rounding in the last bits."""

_M31 = 0x7FFFFFFF


def draw_noise(generator: torch.Generator | None, rows: int, device, out: torch.Tensor | None = None):
    """The noise of `rows` rows: float64 uniforms [rows, NOISE_WIDTH] from `generator`."""
    if out is None:
        out = torch.empty((rows, NOISE_WIDTH), dtype=torch.float64, device=device)
    return torch.rand((rows, NOISE_WIDTH), generator=generator, dtype=torch.float64, out=out)


class Race(NamedTuple):
    times: torch.Tensor
    """[r, c] float64 arrival times, non-decreasing."""
    labels: torch.Tensor
    """[r, c] int64 token ids of the arrivals."""
    keys: torch.Tensor
    """[r, 2] int64 hash keys (31 bits each)."""
    hits: torch.Tensor
    """[r * c] int64 row * V + label of the arrivals, sorted (ties in arrival order)."""
    hit_times: torch.Tensor
    """[r * c] float64 their times."""

    @property
    def last(self) -> torch.Tensor:
        """[r, 1] T_c: every clock without an arrival rings later."""
        return self.times[:, -1:]

    def select(self, rows: torch.Tensor, vocab: int) -> Race:
        return _indexed(self.times[rows], self.labels[rows], self.keys[rows], vocab)


def race(noise: torch.Tensor, vocab: int) -> Race:
    """The race of each row from its uniforms [r, NOISE_WIDTH] (only the first NOISE_WIDTH
    columns are read)."""
    c = NOISE_ARRIVALS
    gaps = torch.log1p(-noise[:, :c]).neg_()  # Exp(1); uniforms are < 1, so finite
    # a zero gap would make a clock 0 and log 0 - log 0 undefined for a zero-probability token
    times = gaps.cumsum(dim=-1).div_(vocab).clamp_(min=torch.finfo(torch.float64).tiny)
    labels = (noise[:, c : 2 * c] * vocab).long().clamp_(max=vocab - 1)
    keys = (noise[:, 2 * c : 2 * c + 2] * (_M31 + 1)).long()
    return _indexed(times, labels, keys, vocab)


def _indexed(times: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, vocab: int) -> Race:
    flat = (torch.arange(len(labels), device=labels.device)[:, None] * vocab + labels).view(-1)
    order = flat.argsort(stable=True)
    return Race(times, labels, keys, flat[order], times.reshape(-1)[order])


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 31-bit integers held in int64 (products stay below 2**63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M31
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M31
    return x ^ (x >> 16)


def hash_uniform(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) with 53 bits, a function of (key pair, token id); keys [..., 2]
    broadcast against ids."""
    h1 = _mix((ids * 0x9E3779B1 + keys[..., 0]) & _M31)
    h2 = _mix((ids * 0x85EBCA77 + keys[..., 1]) & _M31)
    return (h1 * (1 << 22) + (h2 >> 9)).double().mul_(2.0**-53)


def clocks(rc: Race, rows: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """E of tokens `ids` [n] of rows `rows` [n]: the first arrival labelled with it, else T_c + Y."""
    later = rc.last[rows, 0] - torch.log1p(-hash_uniform(rc.keys[rows], ids))
    q = rows * vocab + ids
    at = torch.searchsorted(rc.hits, q).clamp_(max=len(rc.hits) - 1)  # the first, earliest one
    return torch.where(rc.hits[at] == q, rc.hit_times[at], later)


def full_scores(p: torch.Tensor, keep: torch.Tensor | None, rc: Race) -> torch.Tensor:
    """log p - log E for every token of rows p [r, V] (-inf outside `keep`, None = all)."""
    r, v = p.shape
    ids = torch.arange(v, device=p.device)
    e = rc.last - torch.log1p(-hash_uniform(rc.keys[:, None, :], ids))
    e.scatter_reduce_(1, rc.labels, rc.times, reduce="amin")
    score = p.log().sub_(e.log_())
    return score if keep is None else score.masked_fill_(~keep, -torch.inf)


def winner(rows: torch.Tensor, ids: torch.Tensor, score: torch.Tensor, r: int) -> torch.Tensor:
    """Per row, the candidate (rows [n], ids [n], scores [n]) with the highest score, the lowest
    id among equal scores: token ids [r]; a row without candidates gets -1."""
    best = torch.full((r,), -torch.inf, dtype=score.dtype, device=score.device)
    best.scatter_reduce_(0, rows, score, reduce="amax")
    big = torch.iinfo(torch.int64).max
    tok = torch.full((r,), big, dtype=torch.long, device=ids.device)
    tok.scatter_reduce_(0, rows, torch.where(score == best[rows], ids, big), reduce="amin")
    return tok.masked_fill_(tok == big, -1)
