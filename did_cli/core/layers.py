"""Pieces every backbone shares: rotary embeddings, a float32 LayerNorm, the KV cache.

Numerics the samplers rely on: rotary tables are built in pieces of `ROPE_CHUNK` positions, so
a position's value never depends on the table's length, and norms and rotations run in float32
whatever the autocast dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from did_cli.core.attention import attend

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(q, k, v) -> the attention output, [B, H, n, head_dim] each."""

ROPE_CHUNK = 256  # table positions computed per piece (see Rotary.table)


class Rotary(nn.Module):
    """Rotary position embedding over the full head dim, rotate-half layout (base 10000 unless
    given, or explicit frequencies).

    Tables hold the first half of cos/sin ([positions, head_dim / 2]): the two halves of the
    rotate-half layout use the same frequencies. One table per device, grown by doubling; the
    passes read slices of it. A caller that must keep a table alive on its own (a CUDA graph
    replays raw addresses) takes a copy: `Rotary.table`."""

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        inv_freq: torch.Tensor | None = None,
        persistent: bool = True,
    ):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        # persistent for the DiT: BD3-LM checkpoints carry it, and strict loading expects it; a
        # backbone whose frequencies follow from its config (a scaled rope) passes them in
        self.register_buffer("inv_freq", inv_freq, persistent=persistent)
        # a float32 copy outside the buffer: FSDP's mixed precision casts buffers to bf16, which
        # would change cos/sin by up to 0.4 within 1024 positions; refreshed when weights load
        self._exact = inv_freq.detach().float().clone()
        self.register_load_state_dict_post_hook(Rotary._loaded)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _loaded(self, incompatible_keys: object) -> None:
        self.frequencies()

    def frequencies(self) -> torch.Tensor:
        """The float32 frequencies: the buffer's, unless it was cast to a lower precision."""
        if self.inv_freq.dtype in (torch.float32, torch.float64) and self.inv_freq.device.type != "meta":
            self._exact = self.inv_freq.detach().float().clone()
        return self._exact

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A new float32 (cos, sin) table [length, head_dim / 2] for positions 0..length-1. Built
        in pieces of ROPE_CHUNK positions, so that a position's value does not depend on the
        table's length (vectorised CPU kernels treat a tensor's tail elements differently)."""
        inv = self.frequencies().to(device)
        cos, sin = [], []
        for s in range(0, length, ROPE_CHUNK):
            t = torch.arange(s, s + ROPE_CHUNK, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv)
            cos.append(freqs.cos())
            sin.append(freqs.sin())
        return torch.cat(cos)[:length].contiguous(), torch.cat(sin)[:length].contiguous()

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, head_dim / 2] for positions start..start+length-1 (float32 views of
        the shared table)."""
        key, end = str(device), start + length
        tab = self._tables.get(key)
        if tab is None or tab[0].shape[0] < end:
            size = max(end, 2 * tab[0].shape[0] if tab is not None else 0)
            tab = self._tables[key] = self.table(-(-size // ROPE_CHUNK) * ROPE_CHUNK, torch.device(device))
        return tab[0][start:end], tab[1][start:end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [S, D/2] (one half of the table). Computed in float32, returned
    in x's dtype. Rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), on half-width
    temporaries (the same arithmetic as rotating the full width)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    lo = x1 * cos
    lo -= x2 * sin
    hi = x2 * cos
    hi += x1 * sin
    return torch.cat([lo, hi], dim=-1).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and no bias, computed in float32 (as BD3-LM)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), [self.dim]) * self.weight.float()


class EmbeddingLayer(nn.Module):
    """A raw [V, D] parameter named `embedding` (BD3-LM's name), not nn.Embedding."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.embedding (not fancy indexing) keeps the backward a cheap index_add
        return F.embedding(x, self.embedding)


class KVCache:
    """Keys (already rotated) and values of committed clean tokens, per layer.

    Buffers are [B, H, capacity, Dh]; `length` tokens are committed. A step writes its block's
    K/V after the committed ones; `commit` only advances `length`, so an uncommitted write is
    simply overwritten by the next step.
    """

    def __init__(self, cfg: Any, batch: int, capacity: int, device: torch.device, dtype: torch.dtype):
        # grouped-query models cache their key/value heads only
        heads = getattr(cfg, "n_kv_heads", None) or cfg.n_heads
        shape = (batch, heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.capacity = capacity
        # the committed length as a device scalar too, for the static-shape step (CUDA graphs)
        self.start = torch.zeros((), dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. after finished samples leave the batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]


def cached_attention(cache: Any, start: int, end: int) -> Callable[[int], Attention]:
    """Layer i's attention (for `DiT.layers` / `LlamaDiffusion.layers`, over a cache with
    per-layer `k` and `v` lists) for a block at positions start..end: its keys and values written
    into the cache, its queries attending to everything up to `end` (the eager cached step)."""

    def cached(i: int) -> Attention:
        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i][:, :, start:end] = k.to(cache.k[i].dtype)
            cache.v[i][:, :, start:end] = v.to(cache.v[i].dtype)
            kk, vv = cache.k[i][:, :, :end], cache.v[i][:, :, :end]
            return attend(q, kk.to(q.dtype), vv.to(q.dtype), None)

        return attention

    return cached


def static_attention(
    cache: Any, pos: torch.Tensor, visible: torch.Tensor, gqa: bool = False
) -> Callable[[int], Attention]:
    """The same at the device positions `pos`, over the whole fixed-size cache with the mask
    `visible` (the static-shape step: no host value decides a shape)."""

    def static(i: int) -> Attention:
        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i].index_copy_(2, pos, k.to(cache.k[i].dtype))
            cache.v[i].index_copy_(2, pos, v.to(cache.v[i].dtype))
            kk, vv = cache.k[i].to(q.dtype), cache.v[i].to(q.dtype)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=visible, enable_gqa=gqa)

        return attention

    return static
