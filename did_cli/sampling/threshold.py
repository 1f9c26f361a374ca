"""The nucleus of many rows without sorting the vocabulary: a radix select by probability mass.

The nucleus of a row of float64 probabilities p is the longest prefix of the order (p descending,
token id ascending) whose cumulative sum is <= top_p, at least one token (BD3-LM). Sorting 50K
ids per row costs tens of times the row's logits on a CPU; `boundary` finds the same prefix so:

- A key per token orders like the nucleus order. A non-negative double's bit pattern, read as an
  int64, orders like its value; the key is the pattern's offset above the row's smallest p, and
  when that range is narrow (below 2**45 patterns, e.g. a near-uniform row) the key also carries
  2**17 - 1 - id in its low bits, so that ties (which bf16 logits or an untrained model make by
  the thousand) spread over bins in id order.
- Keys are cut into BINS bins of 2**s keys (bin 0 is [MASK]'s). One scatter-add gives each bin's
  mass, a cumulative sum from the top gives the crossing bin (the first whose inclusion passes
  top_p); only its tokens are gathered (found 64 ids at a time), and when there are more than
  SORT_MAX of them they are re-binned in BINS sub-bins (a radix step) until few are left or a
  bin is one key. Those few are sorted, and their running sum, added to the mass above them,
  finds the last kept token.

The sums differ from the full sort's running sum only in the order of the additions, so each is
within (V + 8 BINS) float64 units of top_p of it. A row is marked unsure, for the full sort to
decide, when the sum at its last kept or first dropped token lies within four times that of
top_p, or when the crossing bin is bin 0; otherwise its kept set is exactly the full sort's.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import torch

BINS = 4096
"""Histogram bins per row (and sub-bins per bin when a bin is narrowed)."""
SORT_MAX = 256
"""A crossing bin with more tokens than this is narrowed before it is sorted."""
TIE_MIN = 4096
"""A crossing bin that may hold more tokens than this is checked for being a single tie."""
BLOCK = 64
"""Tokens per block when gathering a bin's tokens (blocks without one are skipped)."""
SCRATCH_BYTES = 1 << 26
"""Largest buffer `scratch` keeps between calls."""
_LOG2_BINS = 12
_ID_BITS = 17  # token ids < 2**17 (GPT-2: 50258; SmolLM2: 49152)
_NARROW = 1 << 45  # ranges of fewer bit patterns carry the token id in the key


class _Scratch(threading.local):
    def __init__(self):
        self.bufs: dict = {}


_SCRATCH = _Scratch()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A buffer kept between calls (per thread, up to SCRATCH_BYTES): a fresh [rows, V] tensor
    per chunk would cost more in page faults than the arithmetic done in it."""
    n = 1
    for d in shape:
        n *= d
    if n * dtype.itemsize > SCRATCH_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, dtype, torch.device(device))
    buf = _SCRATCH.bufs.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # an inference tensor could not be written outside it
            buf = _SCRATCH.bufs[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


class Boundary(NamedTuple):
    """The nucleus of each row: a token is kept when (key, -id) >= (`key_last`, -`id_last`)."""

    lo: torch.Tensor
    """[r] int64: bit pattern the keys count from."""
    tie_bits: torch.Tensor
    """[r] int64: 17 when keys carry the token id, else 0."""
    key_last: torch.Tensor
    """[r] int64: key of the last kept token."""
    id_last: torch.Tensor
    """[r] int64: its id (-1 when exactly the keys above key_last are kept)."""
    mass: torch.Tensor
    """[r] float64: the nucleus' total probability (the renormaliser)."""
    unsure: torch.Tensor
    """[r] bool: rows the full sort must decide."""

    def floor(self) -> torch.Tensor:
        """[r] float64: no kept token has a lower probability."""
        return (self.lo + (self.key_last >> self.tie_bits)).view(torch.float64)

    def keeps(self, rows: torch.Tensor, p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Whether token ids [n] of rows [n], of probabilities p [n], are in the nucleus."""
        k = keys(p.view(torch.int64), ids, self.lo[rows], self.tie_bits[rows])
        last = self.key_last[rows]
        return (k > last) | ((k == last) & (ids <= self.id_last[rows]))


def keys(x: torch.Tensor, ids: torch.Tensor, lo: torch.Tensor, tie_bits: torch.Tensor) -> torch.Tensor:
    """Keys of bit patterns x with token ids (all broadcast together): ordered like the nucleus
    order where they differ; negative below lo."""
    k = (x - lo).clamp_(min=-1) << tie_bits  # clamped: the shift must not overflow
    return k + (((1 << tie_bits) - 1 - ids) & ((1 << tie_bits) - 1))


class Rows(NamedTuple):
    """Probabilities of r rows with what `histogram` needs to bin them."""

    p: torch.Tensor
    """[r, V + pad] float64 probabilities; the padding to a multiple of BLOCK holds zeros."""
    hi: torch.Tensor
    """[r] int64: bit pattern of the largest p."""
    lo: torch.Tensor
    """[r] int64 >= 1: a bit pattern <= every p but [MASK]'s (and underflowed zeros)."""
    mask_id: int
    vocab: int


class Histogram(NamedTuple):
    """Each token's bin (bins ordered like the nucleus order) and each bin's mass."""

    bins: torch.Tensor
    """[r, V + pad] int64: 1 + key >> s; 0 for zeros ([MASK], the padding)."""
    tie_bits: torch.Tensor
    """[r] int64: 17 when the keys carry the token id, else 0."""
    s: torch.Tensor
    """[r] int64: log2 of the keys per bin."""
    mass: torch.Tensor
    """[r, BINS] float64."""
    span: torch.Tensor
    """[r] int64: hi - lo + 1 (bit patterns of the binned range)."""

    def bin_of(self, rows: torch.Tensor, x: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """The lowest bin holding a token of bit pattern >= x (x >= lo; BINS if none can)."""
        d = torch.minimum((x - lo).clamp(min=0), self.span[rows])  # no overflow in the shift
        return (1 + ((d << self.tie_bits[rows]) >> self.s[rows])).clamp_(max=BINS)


@functools.lru_cache(maxsize=8)
def _tie_ids(w: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return (1 << _ID_BITS) - 1 - torch.arange(w, device=device)


def histogram(rows: Rows) -> Histogram:
    p, lo, hi = rows.p, rows.lo, rows.hi
    r, w = p.shape
    tie_bits = torch.where(hi - lo < _NARROW, _ID_BITS, 0)
    span = (hi - lo + 1) << tie_bits
    s = torch.log2(span.double() / (BINS - 2)).ceil_().clamp_(min=0).long()
    s += ((span - 1) >> s) > BINS - 2  # the float log2 may round down
    b = scratch("bins", (r, w), torch.long, p.device)
    x = p.view(torch.int64)
    tie_rows = tie_bits.nonzero()[:, 0]
    if len(tie_rows):  # the keys, in place: (x - lo) << tie_bits, + 2**17 - 1 - id on tie rows
        torch.sub(x, lo[:, None], out=b).clamp_(min=-1)
        b <<= tie_bits[:, None]
        ids = _tie_ids(w, p.device)
        if len(tie_rows) == r:
            b += ids
        else:
            b.index_add_(0, tie_rows, ids.expand(len(tie_rows), w))
        b += (1 << s)[:, None]
    else:
        torch.sub(x, (lo - (1 << s))[:, None], out=b)
    b >>= s[:, None]
    b.clamp_(min=0)  # zeros ([MASK], padding, underflow) are below lo >= 1: bin 0
    mass = torch.zeros((r, BINS), dtype=p.dtype, device=p.device).scatter_add_(1, b, p)
    return Histogram(b, tie_bits, s, mass, hi - lo + 1)


def crossing(mass: torch.Tensor, start: torch.Tensor, top_p: float):
    """The bin of each row's histogram [r, n] (bins ordered like p, n a square) where the sum
    from the top, after `start`, passes top_p: (bin, the sum above it, the sum through it, no
    such bin). A running sum over groups of bins finds the group, one over its bins the bin."""
    r, n = mass.shape
    g = math.isqrt(n)
    flip = mass.flip(-1).view(r, g, g)
    groups = flip.sum(dim=-1).cumsum_(dim=-1).add_(start[:, None])
    q = torch.searchsorted(groups, torch.full_like(start, top_p)[:, None], right=True)[:, 0]
    q.clamp_(max=g - 1)
    before = torch.where(q > 0, groups.gather(1, (q - 1).clamp(min=0)[:, None])[:, 0], start)
    cum = flip.gather(1, q[:, None, None].expand(r, 1, g))[:, 0].cumsum(dim=-1).add_(before[:, None])
    k = torch.searchsorted(cum, torch.full_like(start, top_p)[:, None], right=True)[:, 0]
    none = k >= g
    k.clamp_(max=g - 1)
    above = torch.where(k > 0, cum.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0], before)
    return n - 1 - (q * g + k), above, cum.gather(1, k[:, None])[:, 0], none


def where_blocks(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, ids) of the True entries of a bool [r, w] (w a multiple of BLOCK), row-major,
    looking only inside blocks of BLOCK entries that hold one."""
    r, w = hit.shape
    words = hit.view(torch.int64).view(r, w // BLOCK, BLOCK // 8)
    rows, blk = (words.amax(dim=-1) != 0).nonzero(as_tuple=True)
    inner = hit.view(r * w // BLOCK, BLOCK).index_select(0, rows * (w // BLOCK) + blk)
    at, off = inner.nonzero(as_tuple=True)
    return rows[at], blk[at] * BLOCK + off


def in_bins(h: Histogram, lowest: torch.Tensor, only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, ids) of the tokens whose bin is `lowest` [r] or higher (`only`: just `lowest`);
    a row whose `lowest` is 0 or BINS gets none."""
    hit = scratch("hit", h.bins.shape, torch.bool, h.bins.device)
    lowest = torch.where(lowest <= 0, BINS, lowest)[:, None]
    return where_blocks(torch.eq(h.bins, lowest, out=hit) if only else torch.ge(h.bins, lowest, out=hit))


class _Members(NamedTuple):
    """Tokens of one bin per row, by row then id: row, id, key, p (float64)."""

    rows: torch.Tensor
    ids: torch.Tensor
    key: torch.Tensor
    p: torch.Tensor

    def take(self, keep: torch.Tensor) -> _Members:
        at = keep.nonzero()[:, 0]
        return _Members(*(t.index_select(0, at) for t in self))


def _narrow(m: _Members, low, s, start, incl, top_p: float, r: int):
    """One radix step for the rows whose bin holds more than SORT_MAX tokens: re-bin their
    members in BINS sub-bins of the bin [low, low + 2**s) and keep the crossing one's. Other
    rows are left as they are, so that a row's result does not depend on its batch."""
    go = (torch.bincount(m.rows, minlength=r) > SORT_MAX) & (s > 0)
    s2 = torch.where(go, (s - _LOG2_BINS).clamp(min=0), s)
    sub = (m.key - low[m.rows]) >> s2[m.rows]
    mass = torch.zeros(r * BINS, dtype=m.p.dtype, device=m.p.device).index_add_(0, m.rows * BINS + sub, m.p)
    j, start2, incl2, none = crossing(mass.view(r, BINS), start, top_p)
    keep = ~go[m.rows] | (sub == j[m.rows])
    low = torch.where(go, low + (j << s2), low)
    return m.take(keep), low, s2, torch.where(go, start2, start), torch.where(go, incl2, incl), none & go


def _sort(m: _Members) -> _Members:
    """Members in nucleus order: by row, then key descending, then id ascending."""
    order = m.key.neg().argsort(stable=True)  # ties keep the id order
    order = order.index_select(0, m.rows.index_select(0, order).argsort(stable=True))
    return _Members(*(t.index_select(0, order) for t in m))


def _prefix_sums(m: _Members, start: torch.Tensor, r: int):
    """Per member (in nucleus order), `start` of its row plus the running sum of its row's
    members up to it, sequential per row (as the full sort's cumulative sum); its position."""
    counts = torch.bincount(m.rows, minlength=r)
    pos = torch.arange(len(m.rows), device=m.rows.device) - (counts.cumsum(0) - counts)[m.rows]
    width = int(counts.max()) + 1 if len(m.rows) else 1
    dense = torch.zeros((r, width), dtype=m.p.dtype, device=m.p.device)
    dense[:, 0] = start
    flat = m.rows * width + pos + 1
    dense.view(-1).index_copy_(0, flat, m.p)
    return dense.cumsum_(dim=1).view(-1).index_select(0, flat), pos


class _Ties(NamedTuple):
    """Rows whose crossing bin is one probability shared by many tokens: the nucleus takes the
    first of them by id, as many as fit; found by counting, not by gathering them."""

    rows: torch.Tensor
    """[t] the rows."""
    value: torch.Tensor
    """[t] float64: the shared probability."""
    mask: torch.Tensor
    """[t, V + pad] bool: the bin's tokens."""


def _ties(rows: Rows, h: Histogram, j: torch.Tensor, low: torch.Tensor, start: torch.Tensor) -> _Ties:
    """The rows whose crossing bin may hold more than TIE_MIN tokens (its mass over its lowest
    probability) and holds a single probability."""
    lowest = (rows.lo + (low >> h.tie_bits)).view(torch.float64)
    mass = h.mass.gather(1, j[:, None])[:, 0]
    big = (mass > TIE_MIN * lowest).nonzero()[:, 0]
    x = rows.p.view(torch.int64).index_select(0, big)
    mask = h.bins.index_select(0, big) == j.index_select(0, big)[:, None]
    xmin = torch.where(mask, x, torch.iinfo(torch.int64).max).amin(dim=-1)
    xmax = torch.where(mask, x, -1).amax(dim=-1)
    pure = (xmin == xmax).nonzero()[:, 0]
    return _Ties(big.index_select(0, pure), xmin.index_select(0, pure).view(torch.float64), mask[pure])


def _resolve_ties(t: _Ties, start, incl, top_p: float, eps: float):
    """For tie rows: (kept count, sum at the last kept, sum at the first dropped, last kept id)."""
    st, inc = start.index_select(0, t.rows), incl.index_select(0, t.rows)
    count = t.mask.sum(dim=-1)
    k = torch.minimum(((top_p - st) / t.value).floor_().clamp_(min=0).long(), count)
    k = torch.where((k == 0) & (st == 0), 1, k)  # the top token is always kept
    c_last = st + k * t.value
    c_next = torch.where(k < count, c_last + t.value, inc)
    ranks = t.mask.long().cumsum_(dim=-1)
    ids = torch.searchsorted(ranks, k.clamp(min=1)[:, None])[:, 0]
    return k, c_last, c_next, torch.where(k > 0, ids, -1)


def boundary(rows: Rows, h: Histogram, cross: tuple, top_p: float):
    """The nucleus of each row from its crossing bin (`crossing` of h.mass); the crossing bin's
    tokens that were gathered (rows, ids); the rows whose crossing bin, all ties, was counted
    instead of gathered."""
    p = rows.p
    r, w = p.shape
    v = rows.vocab
    j, start, incl, unsure = cross
    unsure = unsure | (j == 0)  # bin 0 is [MASK]'s (p = 0)
    s = h.s
    low = (j - 1).clamp(min=0) << s
    eps = 4.0 * (v + 8 * BINS) * 2.0**-53 * max(top_p, 1.0)
    ties = _ties(rows, h, j, low, start)
    at_rows, at_ids = in_bins(h, j.index_fill(0, ties.rows, 0), only=True)
    pv = p.view(-1).index_select(0, at_rows * w + at_ids)
    key = keys(pv.view(torch.int64), at_ids, rows.lo[at_rows], h.tie_bits[at_rows])
    m = _Members(at_rows, at_ids, key, pv)
    while len(m.rows) and bool(((torch.bincount(m.rows, minlength=r) > SORT_MAX) & (s > 0)).any()):
        m, low, s, start, incl, none = _narrow(m, low, s, start, incl, top_p, r)
        unsure |= none
    members = (m.rows, m.ids)
    m = _sort(m)
    cum, pos = _prefix_sums(m, start, r)
    n_fit = torch.zeros(r, dtype=torch.long, device=p.device).scatter_add_(0, m.rows, (cum <= top_p).long())
    forced = (n_fit == 0) & (start == 0)  # the top token is always kept
    n_fit = torch.where(forced, 1, n_fit)
    last = (pos == (n_fit - 1)[m.rows]).nonzero()[:, 0]
    nxt = (pos == n_fit[m.rows]).nonzero()[:, 0]
    c_last = start.clone().index_copy_(0, m.rows[last], cum[last])
    # when the whole bin fits, the first dropped token is lower: the sum through the bin bounds it
    c_next = incl.clone().index_copy_(0, m.rows[nxt], cum[nxt])
    # no member kept: exactly the keys above the bin are
    key_last = (low + (1 << s) - 1).index_copy_(0, m.rows[last], m.key[last])
    id_last = torch.full_like(n_fit, -1).index_copy_(0, m.rows[last], m.ids[last])
    if len(ties.rows):
        k, t_last, t_next, t_id = _resolve_ties(ties, start, incl, top_p, eps)
        forced[ties.rows] = (k == 1) & (start.index_select(0, ties.rows) == 0)
        c_last[ties.rows], c_next[ties.rows], id_last[ties.rows] = t_last, t_next, t_id
        tie_key = keys(ties.value.view(torch.int64), t_id, rows.lo[ties.rows], h.tie_bits[ties.rows])
        key_last[ties.rows] = torch.where(k > 0, tie_key, key_last[ties.rows])
    unsure |= ((c_last - top_p).abs() <= eps) & ~forced
    unsure |= (c_next - top_p).abs() <= eps
    return Boundary(rows.lo, h.tie_bits, key_last, id_last, c_last, unsure), members, ties.rows
