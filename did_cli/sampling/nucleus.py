"""From raw logits to a sampled token: float64 probabilities with [MASK] suppressed, nucleus
top-p (BD3-LM's convention), Gumbel-max in float64.

The definitions (`probabilities`, `nucleus`, `token_probs`, `gumbel_argmax`) work on whole
[..., V] rows. `sample_rows` draws one token per row by the same rule in one of two ways that
give the same tokens:
- `pruned=False` (the CUDA path: no host read): sort every row, compute every token's noise;
- `pruned=True` (the CPU path): find the nucleus with a histogram (`did_cli.sampling.threshold`,
  exactly the full sort's kept set, rows it cannot vouch for go to the full sort) and compute the
  noise of a few tokens only (`did_cli.sampling.race`). A row then costs a few passes over its
  float64 probabilities instead of a sort of the vocabulary and V random numbers.

The noise is the exponential race of `did_cli.sampling.race`: G = -log E with E iid Exp(1) in
float64, defined for every token by NOISE_WIDTH uniforms per row; the score is log p + G, ties go
to the lowest token id. The pruned path adds the normaliser and the nucleus' mass in another
order than the definition, so its probabilities agree with it to about 1e-15 (relative), and
depend on a row's logits and noise alone, never on the other rows of the call.
"""

from __future__ import annotations

import math

import torch

from did_cli.sampling.race import MARGIN, Race, clocks, full_scores, race, winner
from did_cli.sampling.threshold import (
    BLOCK,
    Rows,
    boundary,
    crossing,
    histogram,
    in_bins,
    scratch,
    where_blocks,
)

_SMALLEST = 5e-324


def probabilities(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Raw logits [..., V] -> float64 softmax with the [MASK] logit at -inf."""
    lg = logits.to(torch.float64)
    if lg.data_ptr() == logits.data_ptr():
        lg = lg.clone()
    lg[..., mask_id] = -math.inf
    lg -= lg.amax(dim=-1, keepdim=True)
    e = lg.exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def _full_sort(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids) in the nucleus order: probability descending, token id ascending."""
    return probs.sort(dim=-1, descending=True, stable=True)


def _kept(values: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus of rows sorted in the nucleus order: (keep mask [..., w], its mass [..., 1])."""
    cum = values.cumsum(dim=-1)
    keep = cum <= top_p
    keep[..., 0] = True
    m = keep.sum(dim=-1, keepdim=True)  # a prefix: the cumulative sum never decreases
    return keep, cum.gather(-1, m - 1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filter of probabilities [..., V] (BD3-LM): in the order above, keep tokens whose
    cumulative probability including themselves is <= p (the token that crosses p is dropped),
    always keep the top token, renormalise."""
    if top_p >= 1.0:
        return probs
    values, idx = _full_sort(probs)
    keep, den = _kept(values, top_p)
    return torch.zeros_like(probs).scatter_(-1, idx, torch.where(keep, values / den, 0.0))


def token_probs(logits: torch.Tensor, mask_id: int, top_p: float = 1.0) -> torch.Tensor:
    """Raw logits [..., V] -> float64 probabilities with [MASK] suppressed, nucleus-filtered."""
    return nucleus(probabilities(logits, mask_id), top_p)


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(log p + G) over rows of probabilities [r, V] (zeros never win), G = -log E the race's
    float64 Gumbel noise from uniforms [r, NOISE_WIDTH]; ties to the lowest id."""
    return full_scores(probs, probs > 0, race(noise, probs.shape[-1])).argmax(dim=-1)


def _sample_full(p: torch.Tensor, rc: Race, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition on whole rows: full sort, every token's noise (no host read)."""
    keep, den = None, None
    if top_p < 1.0:
        values, idx = _full_sort(p)
        keep_sorted, den = _kept(values, top_p)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)
    tok = full_scores(p, keep, rc).argmax(dim=-1)
    prob = p.gather(-1, tok[:, None])
    return tok, (prob if den is None else prob / den)[:, 0]


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums [r, 1] of rows [r, w] (w a multiple of BLOCK) in an order that does not depend on r
    (a reduction of one row alone may be split between threads)."""
    r, w = x.shape
    return x.view(r, BLOCK, w // BLOCK).sum(dim=1).cumsum_(dim=-1)[:, -1:]


def _rows(logits: torch.Tensor, mask_id: int) -> Rows:
    """`probabilities` (the same arithmetic but for the order of the normaliser's additions, in a
    scratch buffer padded to a multiple of BLOCK with zeros) with the bit range `histogram`
    needs."""
    r, v = logits.shape
    p = scratch("p", (r, -(-v // BLOCK) * BLOCK), torch.float64, logits.device)
    # [MASK]'s logit may be the row's lowest: then lo is only lower than needed (coarser bins)
    low = logits.amin(dim=-1, keepdim=True).double()
    p[:, :v].copy_(logits)  # exact; then the arithmetic of `probabilities`
    p[:, v:] = -math.inf
    p[:, mask_id] = -math.inf
    top = p.amax(dim=-1, keepdim=True)
    z = _row_sums(p.sub_(top).exp_())
    p.div_(z)
    hi = (1.0 / z)[:, 0].view(torch.int64)  # the largest logit's exp is exactly 1
    # a small tensor's exp may round apart from the row's: start a few patterns lower
    lo = ((low - top).exp_() / z)[:, 0].view(torch.int64).sub_(4).clamp_(min=1)
    return Rows(p, hi, lo, mask_id, v)


def _above(rows: Rows, floor: torch.Tensor):
    """(rows, ids) of the tokens with p >= floor [r] (a high bar: a few per row)."""
    hit = scratch("hit", rows.p.shape, torch.bool, rows.p.device)
    return where_blocks(torch.ge(rows.p, floor[:, None], out=hit))


def _floor(best: torch.Tensor, rc: Race) -> torch.Tensor:
    """[r] a kept token without an arrival scores below log p - log T_c, so it can beat `best`
    only when p >= this (and p > 0)."""
    return torch.exp(best + rc.last[:, 0].log() - 2 * MARGIN).clamp_(min=_SMALLEST)


def _best_arrival(hit_p: torch.Tensor, sel: torch.Tensor, rc: Race) -> torch.Tensor:
    """[r] the best score of the selected arrivals [r, c]."""
    return torch.where(sel, hit_p.log() - rc.times.log(), -math.inf).amax(dim=-1)


def _sample_pruned(rs: Rows, rc: Race, top_p: float):
    """The same tokens from a histogram nucleus and the noise of a few tokens (reads the host)."""
    p = rs.p
    r, w = p.shape
    hit_p = p.gather(1, rc.labels)
    live = hit_p > 0
    bd = None
    if top_p >= 1.0:
        floor = _floor(_best_arrival(hit_p, live, rc), rc)
        c_rows, c_ids = _above(rs, floor)
    else:
        h = histogram(rs)
        cross = crossing(h.mass, torch.zeros(r, dtype=p.dtype, device=p.device), top_p)
        bd, region, tie_rows = boundary(rs, h, cross, top_p)
        everyone = torch.arange(r, device=p.device).repeat_interleave(rc.labels.shape[1])
        live &= bd.keeps(everyone, hit_p.view(-1), rc.labels.view(-1)).view(r, -1)
        floor = _floor(_best_arrival(hit_p, live, rc), rc)
        # the crossing bin's kept tokens, and those above it that could beat the arrivals
        j = cross[0]
        jf = torch.maximum(h.bin_of(torch.arange(r, device=p.device), floor.view(torch.int64), rs.lo), j + 1)
        above_rows, above_ids = in_bins(h, jf)
        c_rows, c_ids = torch.cat([region[0], above_rows]), torch.cat([region[1], above_ids])
        c_rows, c_ids = _with_ties(h, tie_rows, bd, floor, j, c_rows, c_ids)
    c_p = p.view(-1).index_select(0, c_rows * w + c_ids)
    ok = c_p >= floor[c_rows]
    if bd is not None:
        ok &= bd.keeps(c_rows, c_p, c_ids)
    at = ok.nonzero()[:, 0]
    c_rows, c_ids, c_p = c_rows.index_select(0, at), c_ids.index_select(0, at), c_p.index_select(0, at)
    # an arrival's clock is its time (a repeated label's later arrivals score lower, harmlessly)
    h_score = torch.where(live, hit_p.log() - rc.times.log(), -math.inf).view(-1)
    c_score = c_p.log_() - clocks(rc, c_rows, c_ids, rs.vocab).log_()
    everyone = torch.arange(r, device=p.device).repeat_interleave(rc.labels.shape[1])
    tok = winner(
        torch.cat([everyone, c_rows]),
        torch.cat([rc.labels.view(-1), c_ids]),
        torch.cat([h_score, c_score]),
        r,
    )
    prob = p.gather(-1, tok.clamp(min=0)[:, None])[:, 0]
    if bd is None:
        return tok, prob, None
    return tok, prob / bd.mass, bd.unsure


def _with_ties(h, tie_rows, bd, floor, j, c_rows, c_ids):
    """Add the tokens of a crossing bin of ties that was counted, not gathered, where their shared
    probability reaches `floor` (rarely: the arrivals usually set a higher bar)."""
    need = tie_rows[bd.floor()[tie_rows] >= floor[tie_rows]]
    if not len(need):
        return c_rows, c_ids
    t_rows, t_ids = in_bins(h, torch.zeros_like(j).index_copy_(0, need, j[need]), only=True)
    return torch.cat([c_rows, t_rows]), torch.cat([c_ids, t_ids])


def kept_set(logits: torch.Tensor, mask_id: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The histogram nucleus of rows of raw logits [r, V] (top_p < 1): (kept [r, V] bool, unsure
    [r] bool). On rows not marked unsure it is the full sort's nucleus (`token_probs(...) > 0`),
    exactly; `sample_rows` hands unsure rows to the full sort."""
    rs = _rows(logits, mask_id)
    r, w = rs.p.shape
    h = histogram(rs)
    cross = crossing(h.mass, torch.zeros(r, dtype=rs.p.dtype, device=rs.p.device), top_p)
    bd, _, _ = boundary(rs, h, cross, top_p)
    rows = torch.arange(r, device=rs.p.device).repeat_interleave(w)
    ids = torch.arange(w, device=rs.p.device).repeat(r)
    kept = bd.keeps(rows, rs.p.reshape(-1), ids).view(r, w)[:, : rs.vocab]
    return kept & (rs.p[:, : rs.vocab] > 0), bd.unsure


def sample_rows(
    logits: torch.Tensor, noise: torch.Tensor, mask_id: int, top_p: float, pruned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of raw logits [r, V] by Gumbel-max with the race noise of uniforms
    noise [r, >= NOISE_WIDTH] (float64; columns past NOISE_WIDTH are ignored): (token ids [r],
    their probabilities in the renormalised nucleus [r], float64). The tokens of
    `gumbel_argmax(token_probs(logits, mask_id, top_p), noise)`. `pruned`: the histogram
    nucleus and a few tokens' noise instead of the full sort and every token's noise; it reads
    sizes back from the device, so sync-free callers leave it off."""
    rc = race(noise, logits.shape[-1])
    if not pruned:
        return _sample_full(probabilities(logits, mask_id), rc, top_p)
    rs = _rows(logits, mask_id)
    tok, prob, unsure = _sample_pruned(rs, rc, top_p)
    if unsure is not None and bool(unsure.any()):
        rows = unsure.nonzero()[:, 0]
        sub = rc.select(rows, rs.vocab)
        t2, p2 = _sample_full(rs.p[:, : rs.vocab].index_select(0, rows), sub, top_p)
        tok, prob = tok.index_copy(0, rows, t2), prob.index_copy(0, rows, p2)
    return tok, prob
