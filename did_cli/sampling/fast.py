"""The fast cached step of `did draft` / `did refine` (`cached_step`), its bf16 weights
(`low_precision_copy`), and `FastFirstHitting`, a benchmark of it.

    from did_cli.sampling.fast import FastFirstHitting
    fh = FastFirstHitting(model, batch=64, length=1024, block_size=4, dtype="bf16")
    out = fh.run(torch.Generator("cuda").manual_seed(0))   # out.tokens [64, 1024], out.conf

`FastFirstHitting` is the algorithm of `did_cli.sampling.drafting` (first-hitting, nucleus,
Gumbel-max in float64, snapshot confidence) for drafts without prompts, suffix or early
stopping, with ONE generator for the whole batch: each call draws uniforms [b, block] for the
position, then [b, race.NOISE_WIDTH] for the token, as the library does. Every step stays on
the device (no `.tolist()`, no counts read back), so the host only queues work, and the model
call is a CUDA-graph replay of the compiled `DiT.step_static`
(`did_cli.sampling.graph.GraphedStep`; the commit pass replays its own graph, without the output
layer). `reference=True` runs the eager cached step (`DiT.step`) with the same draws: both give
the same tokens, which the tests check. At batch 1 the draws are those `sampling.drafting.draft`
makes for sample 0 when given the generator of (seed, 0).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from did_cli.core.dit import DiT
from did_cli.sampling.core import DTYPES, autocast
from did_cli.sampling.graph import EagerStep, GraphedStep
from did_cli.sampling.nucleus import sample_rows
from did_cli.sampling.race import draw_noise


@dataclass
class FastDraftOut:
    tokens: torch.Tensor
    """[b, L] token ids (position 0 = BOS)."""
    conf: torch.Tensor
    """[b, L] float64 snapshot confidences (NaN at BOS)."""
    calls: int
    """Model calls made for the batch (one per generated token + one commit per block but the last)."""


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The precision a `SamplerConfig.dtype` means on `device`: 'auto' is bf16 on a CUDA device
    with bf16 support (the fast precision there; sampling stays float64), else fp32 (CPU
    autocast to bf16 is no faster on most CPUs)."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def low_precision_copy(model: DiT, dtype: torch.dtype) -> DiT:
    """A copy whose Linear weights and biases are `dtype`; every other tensor (the input
    embedding, the norm weights, the rotary frequencies) is shared with `model`, not copied.
    Autocast casts a float32 Linear's weight and bias to `dtype` anyway, so under autocast the
    copy computes exactly what `model` does, without casting the weights inside every call
    (the autocast cache cannot be used inside a CUDA graph). Norms and the residual stream stay
    float32 as in `model`."""
    memo: dict[int, object] = {}
    linear = {id(t) for m in model.modules() if isinstance(m, nn.Linear) for t in m.parameters(recurse=False)}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = nn.Parameter(t.detach().to(dtype), requires_grad=False) if id(t) in linear else t
    return copy.deepcopy(model, memo).eval()


def cached_step(
    model: DiT,
    batch: int,
    capacity: int,
    block: int,
    dtype: str = "fp32",
    mode: str = "auto",
    applies: bool = True,
    net: DiT | None = None,
):
    """The cached step a batch of drafting (or a block stage of refinement) runs, with its
    `path`. `mode` 'auto': on CUDA the static step, compiled and replayed as a CUDA graph (a
    failure of either falls back with one warning line), elsewhere `DiT.step`; 'off': `DiT.step`
    (the reference); 'static': the static step without compile or graph (its arithmetic, on any
    device). `applies` False forces the reference (e.g. rows leave the batch). `net`: the
    `low_precision_copy` to run when dtype is not fp32 (made here when not given). Build and
    call it under `core.autocast(device, dtype, cache=False)`."""
    device = next(model.parameters()).device
    kv = None if dtype == "fp32" else DTYPES[dtype]
    if not applies or mode == "off" or (mode == "auto" and device.type != "cuda"):
        return EagerStep(model, model.new_cache(batch, capacity, dtype=kv))
    if net is None:
        net = model if dtype == "fp32" else low_precision_copy(model, DTYPES[dtype])
    auto = mode == "auto"
    cache = net.new_cache(batch, static_capacity(capacity), dtype=kv)
    return GraphedStep(net, cache, batch, block, use_graph=auto, compile=auto)


def static_capacity(length: int) -> int:
    """KV-cache slots of the static step for `length` tokens: a multiple of 8. The static step
    attends over every slot under a validity mask, and the memory-efficient SDPA kernel wants
    the mask's last dimension aligned to 8 (else it copies the mask into a padded one, or
    another kernel runs)."""
    return -(-length // 8) * 8


class FastFirstHitting:
    """First-hitting drafting of `batch` samples of `length` tokens with block size `block_size`,
    ONE generator for the whole batch (a benchmark of the step; `did draft` gives every sample
    its own generator and runs the same step through `cached_step`).

    Builds the KV cache (keys and values only) and, on CUDA, compiles and captures the step once;
    `run` can be called repeatedly (each call drafts a fresh batch) without capturing again.
    `low_precision_weights` None = when dtype is not fp32."""

    def __init__(
        self,
        model: DiT,
        batch: int,
        length: int | None = None,
        block_size: int = 4,
        top_p: float = 0.9,
        dtype: str = "fp32",
        use_graph: bool | None = None,
        low_precision_weights: bool | None = None,
        reference: bool = False,
        compile: bool | None = None,
    ):
        mc = model.config
        self.length = length or mc.model_length
        if self.length % block_size:
            raise ValueError(f"block size {block_size} does not divide length {self.length}")
        self.batch, self.block, self.top_p, self.dtype, self.reference = (
            batch,
            block_size,
            top_p,
            dtype,
            reference,
        )
        amp = DTYPES[dtype]
        if low_precision_weights is None:
            low_precision_weights = dtype != "fp32"
        if low_precision_weights and dtype != "fp32" and not reference:
            model = low_precision_copy(model, amp)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        cap = self.length if reference else static_capacity(self.length)
        cache = model.new_cache(batch, cap, dtype=None if dtype == "fp32" else amp)
        with self._autocast():
            self.step = (
                EagerStep(model, cache)
                if reference
                else GraphedStep(model, cache, batch, block_size, use_graph=use_graph, compile=compile)
            )
        self.cache = cache

    @property
    def graphed(self) -> bool:
        return isinstance(self.step, GraphedStep) and self.step.graph is not None

    def _autocast(self):
        # no autocast cache: a captured graph must not point at cast copies freed later
        return autocast(self.device, self.dtype, cache=False)

    @torch.no_grad()
    def run(self, generator: torch.Generator) -> FastDraftOut:
        mc = self.model.config
        b, L, B, dev = self.batch, self.length, self.block, self.device
        self.step.reset()
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
                    lg = self.step(win)[rows, pos]  # [b, V]
                    g = draw_noise(generator, b, dev)  # the library's draw: NOISE_WIDTH uniforms per row
                    tok, p = sample_rows(lg, g, mc.mask_id, self.top_p)  # no prefilter: no read-back
                    commit = torch.zeros_like(masked).scatter_(1, pos[:, None], True) & masked
                    x[:, s:e] = torch.where(commit, tok[:, None], win)
                    conf[:, s:e] = torch.where(commit, p[:, None], conf[:, s:e])
                    calls += 1
                if j < n_blocks - 1:
                    self.step.commit(x[:, s:e])
                    calls += 1
        return FastDraftOut(x, conf, calls)


def weight_bytes(model: DiT, dtype: str = "fp32") -> int:
    """Bytes one call reads for the weights that every call multiplies by (all parameters but the
    input embedding, whose rows are gathered), at the element size of `dtype`."""
    size = 4 if dtype == "fp32" else 2
    skip = model.vocab_embed.embedding
    return sum(p.numel() * size for p in model.parameters() if p is not skip)
