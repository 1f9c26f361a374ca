"""The DiT backbone of BD3-LM, weight-compatible with its public checkpoints.

Read top to bottom: the time embedder, one transformer block, the model, then its passes (the
shared rotary embeddings, norm and KV cache are in `did_cli.core.layers`). Loading and saving
weights is `did_cli.io.checkpoint`. Every pass runs the same layer loop, `DiT.layers`, calling each
block through its `forward` (what DDP and FSDP wrappers hook); passes differ only in the attention
each layer does.

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

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from did_cli.core.attention import MaskSpec, attend_kind, mask_for, mask_spec
from did_cli.core.diffusion import token_nll
from did_cli.core.layers import (
    Attention,
    EmbeddingLayer,
    KVCache,
    LayerNorm,
    Rotary,
    apply_rotary,
    cached_attention,
    static_attention,
)
from did_cli.core.model_config import ModelConfig
from did_cli.errors import DidError


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


"""(q, k, v) [B, H, S, Dh], rotated -> attention output [B, H, S, Dh]: what a pass does in a layer."""


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
        self.checkpointing = (
            False  # recompute this layer's activations in the backward (`DiT.set_checkpointing`)
        )
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six adaLN outputs for the time embedding `cond` [1, cond_dim], each [1, 1, D]."""
        return self.adaLN_modulation(cond)[:, None].chunk(6, dim=2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: Attention,
        cond: torch.Tensor | None = None,
        mod: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """One layer: x [B, S, D] -> [B, S, D]. `attention` does this pass's attention on the
        rotated q, k, v; the modulation comes from `cond` (computed here, so a sharded block
        uses its own weights inside its forward) or precomputed as `mod`. With `checkpointing`
        and autograd on, only x is kept for the backward, which runs the layer again (same
        dropout masks: the RNG state is restored)."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self.body, x, cos, sin, attention, cond, mod, use_reentrant=False)
        return self.body(x, cos, sin, attention, cond, mod)

    def body(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: Attention,
        cond: torch.Tensor | None,
        mod: tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor:
        mod = self.modulation(cond) if mod is None else mod
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        b, s, _ = x.shape
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = self.attn_qkv(h).view(b, s, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        att = attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        x = self.residual(x, gate_msa, self.attn_out(att.transpose(1, 2).reshape(b, s, -1)))
        return self.residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))

    def residual(self, x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + gate * F.dropout(branch, p=self.dropout, training=self.training)


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


class StepConstants(NamedTuple):
    """Inputs of `DiT.step_static` that do not change between calls (`DiT.step_constants`)."""

    cos: torch.Tensor
    """[capacity, head_dim / 2] float32."""
    sin: torch.Tensor
    mods: list[tuple[torch.Tensor, ...]]
    """Per block the six adaLN outputs at sigma = 0."""
    final: tuple[torch.Tensor, torch.Tensor]
    """Shift and scale of the output layer."""


def _masked(kind: str | None, mask: Any) -> Attention:
    return functools.partial(attend_kind, kind=kind, mask=mask)


class DiT(nn.Module):
    _no_split_modules = ["DiTBlock"]  # what Accelerate's FSDP auto-wrap shards as one unit by default

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size, cfg.hidden_dim)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.n_layers)])
        self.output_layer = FinalLayer(cfg)
        self._compiled: Callable[..., torch.Tensor] | None = None

    def set_checkpointing(self, on: bool = True) -> DiT:
        """Activation checkpointing per transformer layer (returns self): a layer keeps only its
        input for the backward and recomputes the rest there; the gradients are unchanged."""
        for blk in self.blocks:
            blk.checkpointing = on
        return self

    # -- conditioning -------------------------------------------------------------------------

    def _cond(self) -> torch.Tensor:
        """The time embedding at sigma = 0, [1, cond_dim] (followed by SiLU, as BD3-LM)."""
        return F.silu(self.sigma_map(torch.zeros(1, device=self.vocab_embed.embedding.device)))

    # -- the layer loop and the passes ----------------------------------------------------------

    def layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: Callable[[int], Attention],
        mods: list[tuple[torch.Tensor, ...]] | None = None,
    ) -> torch.Tensor:
        """All transformer layers on hidden states h [B, S, D]; `attention(i)` is layer i's
        attention (a mask, or a KV-cache write and read). `mods`: precomputed modulations per
        layer (the static step), else each block computes its own from sigma = 0."""
        cond = self._cond() if mods is None else None
        for i, blk in enumerate(self.blocks):
            h = blk(h, cos, sin, attention(i), cond=cond, mod=None if mods is None else mods[i])
        return h

    def _backbone(self, x: torch.Tensor, spec: MaskSpec | None, halves: int, run: Any = None) -> torch.Tensor:
        """Run all blocks on token ids x [B, S]; `halves` = 2 for `[x_t ; x_0]` (each half 0..n-1).
        `run`: a callable with the signature of `blocks_pass` to use instead (a compiled copy);
        default: the copy `compile_blocks` made, else `blocks_pass` itself."""
        n = x.shape[1] // halves
        cos, sin = self.rotary_emb.cos_sin(0, n, x.device)
        if halves == 2:
            cos, sin = cos.repeat(2, 1), sin.repeat(2, 1)
        # cached tables and masks are looked up here, outside the region torch.compile may wrap;
        # only the mask kind and object go in (no block size: one graph serves every one)
        kind = None if spec is None else spec.kind
        return (run or self._compiled or self.blocks_pass)(x, cos, sin, kind, mask_for(spec, x.device))

    def blocks_pass(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kind: str | None, mask: Any
    ) -> torch.Tensor:
        """Embedding and all transformer layers under one mask: the region `compile_blocks`
        compiles."""
        attention = _masked(kind, mask)
        return self.layers(self.vocab_embed(x), cos, sin, lambda i: attention)

    def compiled_blocks(self, **kwargs: Any) -> Any:
        """`blocks_pass` under torch.compile (static shapes by default), not installed: one graph
        per (shape, grad mode), whatever the block size, since masks come in as inputs."""
        kwargs.setdefault("dynamic", False)
        return torch.compile(self.blocks_pass, **kwargs)

    def compile_blocks(self, **kwargs: Any) -> DiT:
        """Run the embedding and transformer layers under torch.compile from now on (returns self).

        Static shapes: one graph per (sequence shape, grad mode), built once and then reused;
        switching block sizes recompiles nothing (the mask is an input, see `attention`). The
        boolean `select` gather and the output layer stay outside: the gather has a
        data-dependent size."""
        self._compiled = self.compiled_blocks(**kwargs)
        return self

    def hidden(self, x: torch.Tensor, block_size: int | None = None, run: Any = None) -> torch.Tensor:
        """Hidden states [B, S, D] of the sampling pass (`forward(x, block_size)` without the
        output layer); `run` as in `_backbone`."""
        n = x.shape[1]
        spec = None if block_size is None or block_size >= n else mask_spec("causal", block_size, n)
        return self._backbone(x, spec, 1, run)

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer up to its final linear: norm and adaLN modulation of states [..., D]."""
        shift, scale = self.output_layer.adaLN_modulation(self._cond())[0].chunk(2, dim=-1)
        return modulate(self.output_layer.norm_final(h), shift, scale)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output layer on hidden states [..., D] -> raw logits [..., V] ([MASK] not suppressed)."""
        return self.output_layer.linear(self.head_input(h))

    def forward(
        self,
        x: torch.Tensor,
        block_size: int | None = None,
        x0: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw logits ([MASK] not suppressed), or with `targets` the loss.

        - `x0` given: the vectorised training pass with x = x_t [B, L]; logits of the noisy half.
          Block size >= L runs x_t alone, unmasked (the clean half cannot influence it).
        - `x0` None: the sampling pass over x [B, S] without a cache, block-causal over blocks of
          `block_size` (None or >= S: full bidirectional attention).
        - `select` [B, L] bool: return logits only at those positions, [N, V] in row-major order;
          the output layer is the costliest matrix of a small model, so the loss asks only for
          its masked positions. A LongTensor of flat indices into [B * L] (sorted) selects the
          same rows without a second host sync.
        - `targets` [N] (with `select`): instead of logits, -log p(target) per selected row with
          [MASK] excluded (float32 [N], `did_cli.core.diffusion.token_nll`): the [N, V] logits
          exist one row chunk at a time and never leave this call.
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
        if targets is not None:
            out = self.output_layer.linear
            return token_nll(self.head_input(h), out.weight, out.bias, targets, self.config.mask_id)
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
        end = start + n

        h = self.layers(self.vocab_embed(x), cos, sin, cached_attention(cache, start, end))
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
        c = self._cond()
        mods = [tuple(blk.modulation(c)) for blk in self.blocks]
        shift, scale = self.output_layer.adaLN_modulation(c)[0].chunk(2, dim=-1)
        return StepConstants(cos, sin, mods, (shift, scale))

    def step_static(
        self, x: torch.Tensor, cache: KVCache, consts: StepConstants | None = None, need_logits: bool = True
    ) -> torch.Tensor | None:
        """The cached step with static shapes: positions come from the device scalar
        `cache.start`, keys/values are written with `index_copy_`, and attention runs over the
        whole cache capacity with a validity mask. No host synchronisation and no shape that
        depends on progress, so the call can be compiled and captured once in a CUDA graph and
        replayed (see `did_cli.sampling.graph`). `consts`: `step_constants(cache.capacity)`
        (computed here when not given). Does not commit; returns logits [B, n, V] (None with
        `need_logits=False`: the commit pass only writes keys and values)."""
        n, cap = x.shape[1], cache.capacity
        c = consts if consts is not None else self.step_constants(cap, x.device)
        pos = cache.start + torch.arange(n, device=x.device)
        cos, sin = c.cos.index_select(0, pos), c.sin.index_select(0, pos)
        visible = (torch.arange(cap, device=x.device) < cache.start + n)[None, None, None, :]

        h = self.layers(self.vocab_embed(x), cos, sin, static_attention(cache, pos, visible), mods=c.mods)
        if not need_logits:
            return None
        shift, scale = c.final
        return self.output_layer.linear(modulate(self.output_layer.norm_final(h), shift, scale))
