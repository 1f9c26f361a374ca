"""A Llama-family decoder (Llama, Qwen2, Qwen3) run as a block-diffusion model.

The same interface as the DiT (`did_cli.core.dit`), so training, sampling and refinement call it
unchanged: `forward(x_t, B, x0=x0, select=...)` is the vectorised `[x_t ; x_0]` training pass,
`forward(x, B)` / `hidden(x, B)` the block-causal sampling pass, `step(block, cache, commit)` the
KV-cached drafting step and `step_static` its static-shape twin for CUDA graphs. Attention runs
on the shared core (`did_cli.core.attention`): the mask predicates, flex or SDPA, grouped-query
heads as they are. RMSNorm and rotary run in float32; rotary is the rotate-half layout of
Hugging Face's Llama, so imported weights need no permutation.

The next-token shift (`config.shift`). A causal LM's state at position i predicts token i+1;
every pass returns outputs aligned to positions (row j predicts token j), so samplers and the
loss need no change:
- training pass: a position takes the noisy half's state at j-1 when j-1 is in its block, and
  otherwise (j first in its block) the clean half's state at j-1, which sees exactly 0..j-1;
- sampling pass: row j is the state at j-1;
- cached step: the first position of a block takes the state of the previous block's last
  position, which that block's commit pass computed and left in the cache.
Position 0 (BOS) is never predicted; its row holds its own state. With block size 1 the shifted
model is exactly the source causal model.
"""

from __future__ import annotations

import dataclasses
import functools
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
    Rotary,
    apply_rotary,
    cached_attention,
    static_attention,
)
from did_cli.core.llama_config import LlamaConfig, rope_inv_freq
from did_cli.errors import DidError


class RMSNorm(nn.Module):
    """RMSNorm with a weight, computed in float32 whatever the autocast dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


"""(q, k, v), rotated -> attention output: what a pass does in a layer."""


class LlamaLayer(nn.Module):
    """Pre-norm attention (fused q/k/v rows: all q heads, then k, then v) and a SwiGLU MLP
    (fused gate/up rows: gate, then up)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, dh = cfg.hidden_dim, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, dh
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.qkv_proj = nn.Linear(d, (cfg.n_heads + 2 * cfg.n_kv_heads) * dh, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(dh, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.rms_eps) if cfg.qk_norm else None
        self.o_proj = nn.Linear(cfg.n_heads * dh, d, bias=cfg.o_bias)
        self.mlp_norm = RMSNorm(d, cfg.rms_eps)
        self.gate_up_proj = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.dropout = cfg.dropout
        self.checkpointing = False  # recompute activations in the backward (`set_checkpointing`)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        """One layer: x [B, S, D] -> [B, S, D]; `attention` maps the rotated q [B, H, S, Dh] and k,
        v [B, KV, S, Dh] to the attention output [B, H, S, Dh] (a mask, or a KV cache). Every pass
        calls layers here, so FSDP's hooks on this module see every use of its weights. With
        `checkpointing` and autograd on, only x is kept for the backward."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self.body, x, cos, sin, attention, use_reentrant=False)
        return self.body(x, cos, sin, attention)

    def body(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.finish(x, attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual stream [B, S, D] -> q [B, H, S, Dh], k and v [B, KV, S, Dh] (not rotated)."""
        b, s, _ = x.shape
        dh = self.head_dim
        y = self.qkv_proj(self.attn_norm(x))
        q, k, v = y.split([self.n_heads * dh, self.n_kv * dh, self.n_kv * dh], dim=-1)
        q = q.view(b, s, self.n_heads, dh).transpose(1, 2)
        k = k.view(b, s, self.n_kv, dh).transpose(1, 2)
        v = v.view(b, s, self.n_kv, dh).transpose(1, 2)
        if self.q_norm is not None:
            # back to the projection's dtype: attention wants one dtype for q, k and v
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        return q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, S, Dh] -> both residual branches."""
        b, _, s, _ = attn.shape
        out = self.o_proj(attn.transpose(1, 2).reshape(b, s, -1))
        x = x + F.dropout(out, p=self.dropout, training=self.training)
        gate, up = self.gate_up_proj(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + F.dropout(self.down_proj(F.silu(gate) * up), p=self.dropout, training=self.training)


class LlamaKVCache:
    """Keys (rotated once) and values of committed clean tokens, n_kv_heads heads per layer,
    plus what the shift needs: the state of the last committed position.

    The eager step keeps that state in `prev` when it commits. The static step cannot tell a
    commit from a denoising call, so every call leaves its last state in `pending` with the
    position it ended at (`pending_end`); a call starting there takes it as `prev`: the last
    pass that ended at a block boundary is that block's commit pass."""

    def __init__(
        self, cfg: LlamaConfig, batch: int, capacity: int, device: Any, dtype: Any, state_dtype: Any
    ):
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.capacity = capacity
        self.start = torch.zeros((), dtype=torch.long, device=device)
        state = (batch, cfg.hidden_dim)
        self.prev = torch.zeros(state, device=device, dtype=state_dtype)
        self.pending = torch.zeros(state, device=device, dtype=state_dtype)
        self.pending_end = torch.zeros((), dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + [self.prev, self.pending])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished samples leave the batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.prev, self.pending = self.prev[rows], self.pending[rows]


class LlamaStepConstants(NamedTuple):
    """Inputs of `LlamaDiffusion.step_static` that do not change between calls."""

    cos: torch.Tensor
    """[capacity, head_dim / 2] float32."""
    sin: torch.Tensor


@functools.lru_cache(maxsize=64)
def shift_sources(n: int, block_size: int, halves: int, shift: bool, device: torch.device) -> torch.Tensor:
    """For each position j < n, the row of the backbone's output [halves * n] whose state is
    position j's output (see the module's note on the shift). Cached per shape and device."""
    j = torch.arange(n, device=device)
    if not shift:
        return j
    src = (j - 1).clamp(min=0)
    if halves == 2:  # the first position of a block reads the clean half
        src = torch.where((j % block_size == 0) & (j > 0), n + j - 1, src)
    return src


class LlamaDiffusion(nn.Module):
    _no_split_modules = ["LlamaLayer"]  # what Accelerate's FSDP auto-wrap shards as one unit by default

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size, cfg.hidden_dim)
        # the frequencies follow from the config (theta, scaling): not part of the state dict
        self.rotary_emb = Rotary(cfg.head_dim, inv_freq=rope_inv_freq(cfg), persistent=False)
        self.blocks = nn.ModuleList([LlamaLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.hidden_dim, cfg.rms_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_dim, cfg.vocab_size, bias=False)
        with torch.no_grad():  # a fresh model (imports overwrite everything)
            for name, p in self.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
                elif not name.endswith("norm.weight"):
                    p.zero_()

    def set_checkpointing(self, on: bool = True) -> LlamaDiffusion:
        """Activation checkpointing per layer (returns self); the gradients are unchanged."""
        for blk in self.blocks:
            blk.checkpointing = on
        return self

    # -- passes -----------------------------------------------------------------------------

    def layers(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Callable[[int], Attention]
    ) -> torch.Tensor:
        """All layers on states h [B, S, D]; `attention(i)` is layer i's attention."""
        for i, blk in enumerate(self.blocks):
            h = blk(h, cos, sin, attention(i))
        return h

    def _backbone(self, x: torch.Tensor, spec: MaskSpec | None, halves: int, run: Any = None) -> torch.Tensor:
        """Raw states [B, S, D] of token ids x [B, S] (each of `halves` halves at 0..n-1)."""
        n = x.shape[1] // halves
        cos, sin = self.rotary_emb.cos_sin(0, n, x.device)
        if halves == 2:
            cos, sin = cos.repeat(2, 1), sin.repeat(2, 1)
        kind = None if spec is None else spec.kind
        return (run or self._blocks)(x, cos, sin, kind, mask_for(spec, x.device))

    def _blocks(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kind: str | None, mask: Any
    ) -> torch.Tensor:
        """Embedding and all layers: the region `compile_blocks` compiles."""
        attention = functools.partial(attend_kind, kind=kind, mask=mask)
        return self.layers(self.vocab_embed(x), cos, sin, lambda i: attention)

    def compiled_blocks(self, **kwargs: Any) -> Any:
        """`_blocks` under torch.compile (static shapes by default), not installed."""
        kwargs.setdefault("dynamic", False)
        return torch.compile(self._blocks, **kwargs)

    def compile_blocks(self, **kwargs: Any) -> LlamaDiffusion:
        """Wrap the embedding and layers with torch.compile in place (returns self); the shift's
        gather and the output layer stay outside, as the DiT's select does."""
        self._blocks = self.compiled_blocks(**kwargs)
        return self

    def _aligned(
        self, h: torch.Tensor, n: int, block_size: int, halves: int, select: torch.Tensor | None
    ) -> torch.Tensor:
        """Position-aligned states of raw states h [B, halves * n, D]: [B, n, D], or the
        `select`ed rows [N, D] (a bool mask [B, n] or sorted flat indices into [B * n])."""
        src = shift_sources(n, block_size, halves, self.config.shift, h.device)
        if select is None:
            return h.index_select(1, src)
        if select.dtype == torch.bool:
            select = select.reshape(-1).nonzero().squeeze(1)
        rows = torch.div(select, n, rounding_mode="floor") * h.shape[1] + src[select % n]
        return h.reshape(-1, h.shape[-1]).index_select(0, rows)

    def hidden(self, x: torch.Tensor, block_size: int | None = None, run: Any = None) -> torch.Tensor:
        """Position-aligned states [B, S, D] of the sampling pass (`forward(x, block_size)`
        without the output layer); `run`: a compiled `_blocks` (`compiled_blocks`)."""
        n = x.shape[1]
        spec = None if block_size is None or block_size >= n else mask_spec("causal", block_size, n)
        return self._aligned(self._backbone(x, spec, 1, run), n, n, 1, None)

    def output_weight(self) -> torch.Tensor:
        return self.vocab_embed.embedding if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer: states [..., D] -> raw logits [..., V] ([MASK] not
        suppressed)."""
        return F.linear(self.norm(h), self.output_weight())

    def forward(
        self,
        x: torch.Tensor,
        block_size: int | None = None,
        x0: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw logits aligned to positions ([MASK] not suppressed), as `DiT.forward`:
        - `x0` given: the training pass over `[x_t ; x_0]`; block size >= L runs x_t alone;
        - `x0` None: the sampling pass, block-causal over blocks of `block_size` (None: full);
        - `select`: logits only there (a bool mask [B, L] or sorted flat LongTensor indices);
        - `targets` [N] (with `select`): -log p(target) per row instead of logits (float32,
          `token_nll`: [N, V] logits one row chunk at a time, never returned)."""
        n = x.shape[1]
        if x0 is not None and block_size is not None and block_size < n:
            h = self._backbone(torch.cat([x, x0], dim=1), mask_spec("train", block_size, n), 2)
            h = self._aligned(h, n, block_size, 2, select)
        else:
            spec = None if block_size is None or block_size >= n else mask_spec("causal", block_size, n)
            h = self._aligned(self._backbone(x, spec, 1), n, n, 1, select)
        if targets is not None:
            return token_nll(self.norm(h), self.output_weight(), None, targets, self.config.mask_id)
        return self.logits(h)

    # -- the KV-cached step -------------------------------------------------------------------

    def new_cache(
        self, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None
    ) -> LlamaKVCache:
        p = self.vocab_embed.embedding
        cap = capacity or self.config.model_length
        return LlamaKVCache(self.config, batch, cap, p.device, dtype or p.dtype, p.dtype)

    def step(
        self, x: torch.Tensor, cache: LlamaKVCache, commit: bool = False, need_logits: bool = True
    ) -> torch.Tensor | None:
        """KV-cached pass for the block x [B, n] at positions cache.length.. : queries for the
        block only, which sees every committed token and the whole block. `commit=True` keeps the
        block's keys and values (and, with the shift, its last state). Logits [B, n, V]."""
        start, n = cache.length, x.shape[1]
        if start + n > cache.capacity:
            raise DidError(f"KV cache full: {start} + {n} tokens > capacity {cache.capacity}")
        cos, sin = self.rotary_emb.cos_sin(start, n, x.device)
        end = start + n

        h = self.layers(self.vocab_embed(x), cos, sin, cached_attention(cache, start, end))
        out = h
        if self.config.shift:
            prev = h[:, 0] if start == 0 else cache.prev.to(h.dtype)
            out = torch.cat([prev[:, None], h[:, :-1]], dim=1)
        if commit:
            cache.length = end
            cache.start.fill_(end)
            cache.prev = h[:, -1].detach().clone()
        return self.logits(out) if need_logits else None

    @torch.no_grad()
    def step_constants(self, capacity: int, device: torch.device | None = None) -> LlamaStepConstants:
        """Copies of the rotary table for positions 0..capacity-1, held by the caller (a replayed
        CUDA graph must read memory nothing else can free)."""
        device = device or self.vocab_embed.embedding.device
        cos, sin = (t.clone() for t in self.rotary_emb.cos_sin(0, capacity, device))
        return LlamaStepConstants(cos, sin)

    def step_static(
        self,
        x: torch.Tensor,
        cache: LlamaKVCache,
        consts: LlamaStepConstants | None = None,
        need_logits: bool = True,
    ) -> torch.Tensor | None:
        """The cached step with static shapes (positions from the device scalar `cache.start`,
        `index_copy_` writes, attention over the whole capacity under a validity mask, no host
        sync), for `did_cli.sampling.graph`. Does not commit; returns logits [B, n, V] (None with
        `need_logits=False`, the commit pass, which still leaves the shift state)."""
        n, cap = x.shape[1], cache.capacity
        c = consts if consts is not None else self.step_constants(cap, x.device)
        pos = cache.start + torch.arange(n, device=x.device)
        cos, sin = c.cos.index_select(0, pos), c.sin.index_select(0, pos)
        visible = (torch.arange(cap, device=x.device) < cache.start + n)[None, None, None, :]
        gqa = self.config.n_kv_heads != self.config.n_heads

        h = self.layers(self.vocab_embed(x), cos, sin, static_attention(cache, pos, visible, gqa))
        if self.config.shift:
            cache.prev.copy_(torch.where(cache.pending_end == cache.start, cache.pending, cache.prev))
            first = torch.where(cache.start == 0, h[:, 0], cache.prev.to(h.dtype))
            cache.pending.copy_(h[:, -1])
            cache.pending_end.copy_(cache.start + n)
            h = torch.cat([first[:, None], h[:, :-1]], dim=1)
        return self.logits(h) if need_logits else None


def append_mask_row(
    cfg: LlamaConfig, state: dict[str, torch.Tensor]
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Append a [MASK] row to the embedding (the mean embedding: an input the network already
    reads as a plausible token) and to an untied output layer (zeros; its logit is suppressed
    anyway). Returns the new config (vocab_size + 1, mask_id = the new id) and state dict."""
    state = dict(state)
    emb = state["vocab_embed.embedding"]
    state["vocab_embed.embedding"] = torch.cat([emb, emb.float().mean(0, keepdim=True).to(emb.dtype)])
    if "lm_head.weight" in state:
        w = state["lm_head.weight"]
        state["lm_head.weight"] = torch.cat([w, torch.zeros_like(w[:1])])
    v = cfg.vocab_size
    return dataclasses.replace(cfg, vocab_size=v + 1, mask_id=v), state
