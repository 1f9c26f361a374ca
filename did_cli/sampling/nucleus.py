"""From raw logits to a sampled token: float64 probabilities with [MASK] suppressed, nucleus
top-p (BD3-LM's convention), Gumbel-max.

The definitions (`probabilities`, `nucleus`, `gumbel_argmax`) work on whole [..., V] rows.
`sample_rows` draws one token per row with the same arithmetic but never holds more than a few
[rows, V] tensors, and can skip the full sort over the vocabulary: a top-k prefilter finds the
nucleus among the k most probable tokens, and only rows where that is not provably the same set
go through the full sort.

Why the prefilter gives the same tokens and probabilities. Order tokens by (probability
descending, token id ascending); the nucleus is the longest prefix of that order whose
cumulative sum is <= p (at least the first token), since a cumulative sum of non-negative
numbers never decreases. Let S be the k tokens `topk` returns and q the smallest probability in
S: every token with probability > q is in S. Sorting S by the same key puts those tokens first,
in the same order as the full sort. So when the nucleus of S has m < k tokens and its last one
has probability > q, the first m tokens, their cumulative sums and the test at the (m+1)-th
(a token of probability q in both orders, or the same token) are those of the full sort: the
kept set, the renormaliser (the cumulative sum at the m-th token) and every kept probability
are identical. Rows where the nucleus reaches k, or ends in a tie with q, take the full sort.
"""

from __future__ import annotations

import math

import torch

PREFILTER_K = 256
"""Candidates the top-k prefilter keeps per row."""


def probabilities(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Raw logits [..., V] -> float64 softmax with the [MASK] logit at -inf."""
    lg = logits.to(torch.float64)
    if lg.data_ptr() == logits.data_ptr():
        lg = lg.clone()
    lg[..., mask_id] = -math.inf
    e = (lg - lg.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def _full_sort(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids) in the nucleus order: probability descending, token id ascending."""
    return probs.sort(dim=-1, descending=True, stable=True)


def _kept(values: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus of rows sorted in the nucleus order: (keep mask [r, w], renormalised values)."""
    cum = values.cumsum(dim=-1)
    keep = cum <= top_p
    keep[..., 0] = True
    m = keep.sum(dim=-1, keepdim=True)  # a prefix: the cumulative sum never decreases
    den = cum.gather(-1, m - 1)
    return keep, torch.where(keep, values / den, 0.0)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filter of probabilities [..., V] (BD3-LM): in the order above, keep tokens whose
    cumulative probability including themselves is <= p (the token that crosses p is dropped),
    always keep the top token, renormalise."""
    if top_p >= 1.0:
        return probs
    values, idx = _full_sort(probs)
    _, renorm = _kept(values, top_p)
    return torch.zeros_like(probs).scatter_(-1, idx, renorm)


def token_probs(logits: torch.Tensor, mask_id: int, top_p: float = 1.0) -> torch.Tensor:
    """Raw logits [..., V] -> float64 probabilities with [MASK] suppressed, nucleus-filtered."""
    return nucleus(probabilities(logits, mask_id), top_p)


def gumbel_argmax(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """argmax(log p + Gumbel) with Gumbel = -log(-log u), all in float64."""
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return (probs.log() - (-u.log()).log()).argmax(dim=-1)


def _draw_sorted(
    values: torch.Tensor, idx: torch.Tensor, u: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-max over the nucleus of rows in nucleus order; u [r, V] uniforms by token id."""
    keep, renorm = _kept(values, top_p)
    ug = u.gather(-1, idx).clamp_min(torch.finfo(torch.float64).tiny)
    score = torch.where(keep, renorm.log() - (-ug.log()).log(), -math.inf)
    j = score.argmax(dim=-1, keepdim=True)
    return idx.gather(-1, j)[:, 0], renorm.gather(-1, j)[:, 0]


def _prefilter(probs: torch.Tensor, top_p: float, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most probable tokens per row in nucleus order, and the rows they do not settle."""
    vals, idx = probs.topk(k, dim=-1)
    idx, perm = idx.sort(dim=-1)  # token id ascending, then a stable sort by probability
    vals, perm = vals.gather(-1, perm).sort(dim=-1, descending=True, stable=True)
    idx = idx.gather(-1, perm)
    keep, _ = _kept(vals, top_p)
    m = keep.sum(dim=-1, keepdim=True)
    unsettled = (m[:, 0] == k) | (vals.gather(-1, m - 1)[:, 0] == vals[:, -1])
    return vals, idx, unsettled


def sample_rows(
    logits: torch.Tensor, u: torch.Tensor, mask_id: int, top_p: float, prefilter: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of raw logits [r, V] by Gumbel-max with uniforms u [r, V] (float64):
    (token ids [r], their renormalised probabilities [r], float64). The same tokens and
    probabilities as `gumbel_argmax(token_probs(logits, mask_id, top_p), u)`. `prefilter`: try
    the top-k nucleus first (see the module docstring); it reads back which rows need the full
    sort, one host synchronisation, so sync-free callers leave it off."""
    probs = probabilities(logits, mask_id)
    if top_p >= 1.0:
        tok = gumbel_argmax(probs, u)
        return tok, probs.gather(-1, tok[:, None])[:, 0]
    k = min(PREFILTER_K, probs.shape[-1])
    if not prefilter or k == probs.shape[-1]:
        values, idx = _full_sort(probs)
        return _draw_sorted(values, idx, u, top_p)
    vals, idx, unsettled = _prefilter(probs, top_p, k)
    tok, p = _draw_sorted(vals, idx, u, top_p)
    rows = unsettled.nonzero()[:, 0]
    if rows.numel():
        values, fidx = _full_sort(probs.index_select(0, rows))
        t2, p2 = _draw_sorted(values, fidx, u.index_select(0, rows), top_p)
        tok, p = tok.index_copy(0, rows, t2), p.index_copy(0, rows, p2)
    return tok, p
