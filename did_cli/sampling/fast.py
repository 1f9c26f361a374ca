"""First-hitting drafting without host synchronisation: the fast path for benchmarks and batch jobs.

    from did_cli.sampling.fast import FastFirstHitting
    fh = FastFirstHitting(model, batch=64, length=1024, block_size=4, dtype="bf16")
    out = fh.run(torch.Generator("cuda").manual_seed(0))   # out.tokens [64, 1024], out.conf

The same algorithm as `did_cli.sampling.drafting` (first-hitting, nucleus, Gumbel-max in float64,
snapshot confidence), for drafts without prompts, suffix or early stopping, and with ONE
generator for the whole batch: each call draws uniforms [b, block] for the position, then
[b, V] for the token. Every step stays on the device (no `.tolist()`, no counts read back), so
the host only queues work, and the model call is a CUDA-graph replay of `DiT.step_static`
(`did_cli.sampling.graph.GraphedStep`). `reference=True` runs the eager cached step (`DiT.step`)
with the same draws: both give the same tokens, which the tests check. At batch 1 the draws are
those `sampling.drafting.draft` makes for sample 0 when given the generator of (seed, 0).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from did_cli.model import DiT
from did_cli.sampling.core import DTYPES, gumbel_argmax, token_probs
from did_cli.sampling.graph import GraphedStep


@dataclass
class FastDraftOut:
    tokens: torch.Tensor
    """[b, L] token ids (position 0 = BOS)."""
    conf: torch.Tensor
    """[b, L] float64 snapshot confidences (NaN at BOS)."""
    calls: int
    """Model calls made for the batch (one per generated token + one commit per block but the last)."""


def low_precision_copy(model: DiT, dtype: torch.dtype) -> DiT:
    """A copy whose parameters (not buffers: rotary frequencies stay float32) are `dtype`. Under
    autocast a call then reads each weight once in `dtype` instead of casting float32 weights
    inside every call (the autocast cache cannot be used inside a CUDA graph). The residual
    stream is then `dtype` too, so logits differ slightly from float32 weights under autocast."""
    low = copy.deepcopy(model)
    for p in low.parameters():
        p.data = p.data.to(dtype)
    return low.eval()


class FastFirstHitting:
    """First-hitting drafting of `batch` samples of `length` tokens with block size `block_size`.

    Builds the KV cache (keys and values only) and, on CUDA, captures the step once; `run` can be
    called repeatedly (each call drafts a fresh batch) without capturing again."""

    def __init__(self, model: DiT, batch: int, length: int | None = None, block_size: int = 4, top_p: float = 0.9,
                 dtype: str = "fp32", use_graph: bool | None = None, low_precision_weights: bool = False,
                 reference: bool = False):
        mc = model.config
        self.length = length or mc.model_length
        if self.length % block_size:
            raise ValueError(f"block size {block_size} does not divide length {self.length}")
        self.batch, self.block, self.top_p, self.dtype, self.reference = batch, block_size, top_p, dtype, reference
        amp = DTYPES[dtype]
        if low_precision_weights and dtype != "fp32":
            model = low_precision_copy(model, amp)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(batch, self.length, dtype=None if dtype == "fp32" else amp)
        self.step = None
        if not reference:
            with self._autocast():
                self.step = GraphedStep(model, self.cache, batch, block_size, use_graph=use_graph)

    @property
    def graphed(self) -> bool:
        return self.step is not None and self.step.graph is not None

    def _autocast(self):
        # no autocast cache: a captured graph must not point at cast copies freed later
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32", cache_enabled=False)

    def _reset(self) -> None:
        self.cache.length = 0
        self.cache.start.zero_()  # stale keys beyond `start` are masked out by step_static

    def _logits(self, win: torch.Tensor) -> torch.Tensor:
        return self.model.step(win, self.cache) if self.reference else self.step(win)

    def _commit(self, win: torch.Tensor) -> None:
        if self.reference:
            self.model.step(win, self.cache, commit=True, need_logits=False)
        else:
            self.step.commit(win)

    @torch.no_grad()
    def run(self, generator: torch.Generator) -> FastDraftOut:
        mc = self.model.config
        b, L, B, dev = self.batch, self.length, self.block, self.device
        self._reset()
        x = torch.full((b, L), mc.mask_id, dtype=torch.long, device=dev)
        x[:, 0] = mc.bos_id
        conf = torch.full((b, L), math.nan, dtype=torch.float64, device=dev)
        rows = torch.arange(b, device=dev)
        calls = 0
        n_blocks = L // B
        with self._autocast():
            for j in range(n_blocks):
                s, e = j * B, (j + 1) * B
                # every row has the same masks (no prompts): the step count is known on the host
                for _ in range(B - 1 if s == 0 else B):
                    win = x[:, s:e]
                    masked = win == mc.mask_id
                    u = torch.rand((b, B), generator=generator, dtype=torch.float64, device=dev)
                    pos = torch.where(masked, u, -1.0).argmax(dim=1)
                    lg = self._logits(win)[rows, pos]  # [b, V]
                    probs = token_probs(lg, mc.mask_id, self.top_p)
                    g = torch.rand(probs.shape, generator=generator, dtype=torch.float64, device=dev)
                    tok = gumbel_argmax(probs, g)
                    p = probs.gather(1, tok[:, None])
                    commit = torch.zeros_like(masked).scatter_(1, pos[:, None], True) & masked
                    x[:, s:e] = torch.where(commit, tok[:, None], win)
                    conf[:, s:e] = torch.where(commit, p, conf[:, s:e])
                    calls += 1
                if j < n_blocks - 1:
                    self._commit(x[:, s:e])
                    calls += 1
        return FastDraftOut(x, conf, calls)


def weight_bytes(model: DiT, dtype: str = "fp32") -> int:
    """Bytes one call reads for the weights that every call multiplies by (all parameters but the
    input embedding, whose rows are gathered), at the element size of `dtype`."""
    size = 4 if dtype == "fp32" else 2
    skip = model.vocab_embed.embedding
    return sum(p.numel() * size for p in model.parameters() if p is not skip)
