"""The DiT backbone of BD3-LM, weight-compatible with its public checkpoints.

Read top to bottom: rotary embeddings, norms, one transformer block, the model, then its three
forward passes. Loading and saving weights is `did_cli.io.checkpoint`.

- `forward(xt, block_size, x0=x0, select=mask)`: the vectorised `[x_t ; x_0]` training pass,
  logits of the noisy half only, and only at `select`ed positions (the 50258-wide output layer is
  the costliest matrix of a small model). Block size >= L drops the clean half (nothing can see
  it) and runs L tokens unmasked: the MDLM pass, half the cost.
- `forward(x, block_size)`: the sampling pass without a cache, block-causal over blocks.
- `step(x_block, cache, commit)`: the KV-cached sampling pass; queries for the current block only.

State-dict names are BD3-LM's (REFERENCE.md section 2) with a `backbone.` prefix added on save.
Time conditioning is off as in BD3-LM: sigma is always zero, so every adaLN output is a learned
constant, computed once per forward as a [1, ...] tensor that broadcasts over the batch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from did_cli.core.attention import MaskSpec, attend, attend_kind, mask_for, mask_spec
from did_cli.core.model_config import ModelConfig
from did_cli.errors import DidError

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


ROPE_CHUNK = 256  # table positions computed per piece (see Rotary.table)


class Rotary(nn.Module):
    """Rotary position embedding, base 10000, full head dim, rotate-half layout.

    Tables hold the first half of cos/sin ([positions, head_dim / 2]): the two halves of the
    rotate-half layout use the same frequencies. One table per device, grown by doubling; the
    passes read slices of it. A caller that must keep a table alive on its own (a CUDA graph
    replays raw addresses) takes a copy: `Rotary.table`."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        # persistent: BD3-LM checkpoints carry it, and strict loading expects it
        self.register_buffer("inv_freq", inv_freq)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A new float32 (cos, sin) table [length, head_dim / 2] for positions 0..length-1. Built
        in pieces of ROPE_CHUNK positions, so that a position's value does not depend on the
        table's length (vectorised CPU kernels treat a tensor's tail elements differently)."""
        inv = self.inv_freq.to(device=device, dtype=torch.float32)
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


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal(256) -> Linear -> SiLU -> Linear; named `sigma_map` in the state dict."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half
        )
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class EmbeddingLayer(nn.Module):
    """A raw [V, D] parameter named `embedding` (BD3-LM's name), not nn.Embedding."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.embedding (not fancy indexing) keeps the backward a cheap index_add
        return F.embedding(x, self.embedding)


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.n_heads = cfg.n_heads
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)  # rows: all-heads Q, then K, then V
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * d, d)
        )
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
        self.dropout = cfg.dropout
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def qkv(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normed, modulated input -> q, k, v each [B, H, S, Dh] (not yet rotated)."""
        b, s, _ = x.shape
        h = modulate(self.norm1(x), shift, scale)
        qkv = self.attn_qkv(h).view(b, s, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def residual(self, x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + gate * F.dropout(branch, p=self.dropout, training=self.training)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Attention output [B, H, S, Dh] -> both residual branches."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        b, _, s, _ = attn.shape
        x = self.residual(x, gate_msa, self.attn_out(attn.transpose(1, 2).reshape(b, s, -1)))
        return self.residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_dim)
        self.linear = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)
        for p in (
            self.linear.weight,
            self.linear.bias,
            self.adaLN_modulation.weight,
            self.adaLN_modulation.bias,
        ):
            nn.init.zeros_(p)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Keys (already rotated) and values of committed clean tokens, per layer.

    Buffers are [B, H, capacity, Dh]; `length` tokens are committed. A step writes its block's
    K/V after the committed ones; `commit` only advances `length`, so an uncommitted write is
    simply overwritten by the next step.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, cfg.n_heads, capacity, cfg.head_dim)
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


class StepConstants(NamedTuple):
    """Inputs of `DiT.step_static` that do not change between calls (`DiT.step_constants`)."""

    cos: torch.Tensor
    """[capacity, head_dim / 2] float32."""
    sin: torch.Tensor
    mods: list[tuple[torch.Tensor, ...]]
    """Per block the six adaLN outputs at sigma = 0."""
    final: tuple[torch.Tensor, torch.Tensor]
    """Shift and scale of the output layer."""


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size, cfg.hidden_dim)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.n_layers)])
        self.output_layer = FinalLayer(cfg)

    # -- conditioning -------------------------------------------------------------------------

    def _cond(self) -> torch.Tensor:
        """The time embedding at sigma = 0, [1, cond_dim] (followed by SiLU, as BD3-LM)."""
        return F.silu(self.sigma_map(torch.zeros(1, device=self.vocab_embed.embedding.device)))

    def _modulations(self) -> list[tuple[torch.Tensor, ...]]:
        """adaLN outputs for sigma = 0: per block six [1, 1, D] tensors (broadcast over batch)."""
        c = self._cond()
        return [blk.adaLN_modulation(c)[:, None].chunk(6, dim=2) for blk in self.blocks]

    # -- passes ---------------------------------------------------------------------------------

    def _backbone(self, x: torch.Tensor, spec: MaskSpec | None, halves: int, run: Any = None) -> torch.Tensor:
        """Run all blocks on token ids x [B, S]; `halves` = 2 for `[x_t ; x_0]` (each half 0..n-1).
        `run`: a callable with the signature of `_blocks` to use instead (a compiled copy)."""
        n = x.shape[1] // halves
        cos, sin = self.rotary_emb.cos_sin(0, n, x.device)
        if halves == 2:
            cos, sin = cos.repeat(2, 1), sin.repeat(2, 1)
        # cached tables and masks are looked up here, outside the region torch.compile may wrap;
        # only the mask kind and object go in (no block size: one graph serves every one)
        kind = None if spec is None else spec.kind
        return (run or self._blocks)(x, cos, sin, kind, mask_for(spec, x.device))

    def _blocks(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kind: str | None, mask: Any
    ) -> torch.Tensor:
        """Embedding and all transformer blocks: the region `compile_blocks` compiles."""
        h = self.vocab_embed(x)
        for blk, mod in zip(self.blocks, self._modulations()):
            q, k, v = blk.qkv(h, mod[0], mod[1])
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            h = blk.finish(h, attend_kind(q, k, v, kind, mask), mod)
        return h

    def compiled_blocks(self, **kwargs: Any) -> Any:
        """`_blocks` under torch.compile (static shapes by default), not installed: one graph per
        (shape, grad mode), whatever the block size, since masks come in as inputs."""
        kwargs.setdefault("dynamic", False)
        return torch.compile(self._blocks, **kwargs)

    def compile_blocks(self, **kwargs: Any) -> DiT:
        """Wrap the embedding and transformer blocks with torch.compile (in place; returns self).

        Static shapes: one graph per (sequence shape, grad mode), built once and then reused;
        switching block sizes recompiles nothing (the mask is an input, see `attention`). The
        boolean `select` gather and the output layer stay outside: the gather has a
        data-dependent size."""
        self._blocks = self.compiled_blocks(**kwargs)  # instance attribute shadows the method
        return self

    def hidden(self, x: torch.Tensor, block_size: int | None = None, run: Any = None) -> torch.Tensor:
        """Hidden states [B, S, D] of the sampling pass (`forward(x, block_size)` without the
        output layer); `run` as in `_backbone`."""
        n = x.shape[1]
        spec = None if block_size is None or block_size >= n else mask_spec("causal", block_size, n)
        return self._backbone(x, spec, 1, run)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output layer on hidden states [..., D] -> raw logits [..., V] ([MASK] not suppressed)."""
        shift, scale = self.output_layer.adaLN_modulation(self._cond())[0].chunk(2, dim=-1)
        return self.output_layer.linear(modulate(self.output_layer.norm_final(h), shift, scale))

    def forward(
        self,
        x: torch.Tensor,
        block_size: int | None = None,
        x0: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw logits ([MASK] not suppressed).

        - `x0` given: the vectorised training pass with x = x_t [B, L]; logits of the noisy half.
          Block size >= L runs x_t alone, unmasked (the clean half cannot influence it).
        - `x0` None: the sampling pass over x [B, S] without a cache, block-causal over blocks of
          `block_size` (None or >= S: full bidirectional attention).
        - `select` [B, L] bool: return logits only at those positions, [N, V] in row-major order;
          the output layer is the costliest matrix of a small model, so the loss asks only for
          its masked positions. A LongTensor of flat indices into [B * L] (sorted) selects the
          same rows without a second host sync.
        Training goes through here (not the helpers) so DDP/FSDP wrappers see every parameter use.
        """
        n = x.shape[1]
        if x0 is not None and block_size is not None and block_size < n:
            h = self._backbone(torch.cat([x, x0], dim=1), mask_spec("train", block_size, n), 2)[:, :n]
        else:
            spec = None if block_size is None or block_size >= n else mask_spec("causal", block_size, n)
            h = self._backbone(x, spec, 1)
        if select is not None:
            # flat indices into [B * L] (the caller's one nonzero, reused for its targets) or a mask
            h = (
                h.reshape(-1, h.shape[-1]).index_select(0, select)
                if select.dtype == torch.long
                else h[select]
            )
        return self.logits(h)

    def new_cache(self, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.vocab_embed.embedding
        return KVCache(self.config, batch, capacity or self.config.model_length, p.device, dtype or p.dtype)

    def step(
        self, x: torch.Tensor, cache: KVCache, commit: bool = False, need_logits: bool = True
    ) -> torch.Tensor | None:
        """KV-cached pass for the block x [B, n] at positions cache.length.. : queries for the
        block only; it sees every committed token and the whole block. `commit=True` appends the
        block's keys and values to the cache (the block is final). Returns logits [B, n, V]."""
        start, n = cache.length, x.shape[1]
        if start + n > cache.capacity:
            raise DidError(f"KV cache full: {start} + {n} tokens > capacity {cache.capacity}")
        cos, sin = self.rotary_emb.cos_sin(start, n, x.device)
        h = self.vocab_embed(x)
        end = start + n
        for i, (blk, mod) in enumerate(zip(self.blocks, self._modulations())):
            q, k, v = blk.qkv(h, mod[0], mod[1])
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache.k[i][:, :, start:end] = k.to(cache.k[i].dtype)
            cache.v[i][:, :, start:end] = v.to(cache.v[i].dtype)
            kk, vv = cache.k[i][:, :, :end], cache.v[i][:, :, :end]
            h = blk.finish(h, attend(q, kk.to(q.dtype), vv.to(q.dtype), None), mod)
        if commit:
            cache.length = end
            cache.start.fill_(end)
        return self.logits(h) if need_logits else None

    @torch.no_grad()
    def step_constants(self, capacity: int, device: torch.device | None = None) -> StepConstants:
        """What every static step reads besides the cache and the weights, computed once (under
        the caller's autocast, as `step` computes them per call): copies of the rotary table for
        positions 0..capacity-1 and the sigma = 0 modulations. Held by the caller, so a replayed
        CUDA graph reads memory nothing else can free."""
        device = device or self.vocab_embed.embedding.device
        cos, sin = (t.clone() for t in self.rotary_emb.cos_sin(0, capacity, device))
        mods = [tuple(m) for m in self._modulations()]
        shift, scale = self.output_layer.adaLN_modulation(self._cond())[0].chunk(2, dim=-1)
        return StepConstants(cos, sin, mods, (shift, scale))

    def step_static(
        self, x: torch.Tensor, cache: KVCache, consts: StepConstants | None = None
    ) -> torch.Tensor:
        """The cached step with static shapes: positions come from the device scalar
        `cache.start`, keys/values are written with `index_copy_`, and attention runs over the
        whole cache capacity with a validity mask. No host synchronisation and no shape that
        depends on progress, so the call can be compiled and captured once in a CUDA graph and
        replayed (see `did_cli.sampling.graph`). `consts`: `step_constants(cache.capacity)`
        (computed here when not given). Does not commit; returns logits [B, n, V]."""
        n, cap = x.shape[1], cache.capacity
        c = consts if consts is not None else self.step_constants(cap, x.device)
        pos = cache.start + torch.arange(n, device=x.device)
        cos, sin = c.cos.index_select(0, pos), c.sin.index_select(0, pos)
        visible = (torch.arange(cap, device=x.device) < cache.start + n)[None, None, None, :]
        h = self.vocab_embed(x)
        for i, (blk, mod) in enumerate(zip(self.blocks, c.mods)):
            q, k, v = blk.qkv(h, mod[0], mod[1])
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache.k[i].index_copy_(2, pos, k.to(cache.k[i].dtype))
            cache.v[i].index_copy_(2, pos, v.to(cache.v[i].dtype))
            att = F.scaled_dot_product_attention(
                q, cache.k[i].to(q.dtype), cache.v[i].to(q.dtype), attn_mask=visible
            )
            h = blk.finish(h, att, mod)
        shift, scale = c.final
        return self.output_layer.linear(modulate(self.output_layer.norm_final(h), shift, scale))
