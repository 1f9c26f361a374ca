"""The sampler core that drafting and refinement share: configuration checks, seeds, nucleus
filtering, Gumbel-max, the fill loop that turns model calls into committed tokens, and the
plumbing around a model call (device, dtype, eval mode, progress).

How one model call turns into committed tokens (`fill`):
- logits -> float64, [MASK] logit -> -inf, softmax, nucleus top-p (BD3-LM's convention: keep the
  tokens whose cumulative probability *including themselves* is <= p, the top token always),
  renormalise; sample by Gumbel-max in float64 (`did_cli.sampling.nucleus`; on a CPU without
  sorting the vocabulary or drawing noise for every token).
- memory: each sample draws its rows' noise (race.NOISE_WIDTH uniforms per row) in one call of
  its generator first; rows are then sampled in chunks, so a call never holds more than a few
  [chunk, V] float64 tensors however many positions are masked, and the chunking cannot change
  a draw. A pass that returns hidden states (`RowLogits`) computes the output layer chunk by
  chunk too.
- first-hitting: one uniformly chosen masked position per sample per call. The position is
  drawn first and only its token is sampled: the same distribution as drawing candidates
  everywhere and keeping one, at a fraction of the cost.
- parallel: candidates at every masked position; commit the K most confident, or every one whose
  probability is >= the threshold (at least the most confident one).
- snapshot confidence of a committed token = its probability under the filtered, renormalised
  distribution it was drawn from.

Randomness: every sample owns a torch.Generator that advances only when that sample draws, so a
sample's tokens do not depend on the batch it ran in, nor on the KV cache being used.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from did_cli.errors import DidError

# the sampling primitives, re-exported for the fast paths and the tests
from did_cli.sampling.nucleus import gumbel_argmax, nucleus, sample_rows, token_probs  # noqa: F401
from did_cli.sampling.race import NOISE_WIDTH, draw_noise
from did_cli.util import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------- primitives


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from several parts (so that seed 1 sample 0 != seed 0 sample 1)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class SamplerSettings:
    """How one model call's logits become committed tokens (shared by draft and refine)."""

    sampler: str
    k: int | None
    threshold: float | None
    top_p: float
    mask_id: int


class RowLogits(NamedTuple):
    """Raw logits of N rows computed on demand: `head(h[lo:hi])` (the output layer is the
    costliest matrix of a small model, and [N, V] logits of a whole batch do not fit)."""

    h: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    vocab: int


LogitsFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | RowLogits"]
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 25}
"""Bytes of one [rows, V] float64 tensor per sampling chunk (several such are alive at once)."""
CPU_SAMPLE_ROWS = 16
"""On a CPU, rows sampled together: the output layer runs on a whole chunk (it reads its weights
once per call), the sampler on a few rows at a time, whose passes then stay in the cache."""


def draw(
    out: torch.Tensor | RowLogits, groups: list[tuple[int, int]], gens: list, sp: SamplerSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `out` ([N, V] logits or RowLogits); rows come in `groups`
    (sample i, its row count) in order, and a group whose generator is None draws nothing (its
    row is a placeholder). Returns token ids [N] and float64 probabilities [N]."""
    lazy = isinstance(out, RowLogits)
    vocab = out.vocab if lazy else out.shape[-1]
    dev, total = out.h.device if lazy else out.device, sum(c for _, c in groups)
    # a sample's noise is one call of its generator, so rows can then be chunked any way
    noise = torch.zeros((total, NOISE_WIDTH), dtype=torch.float64, device=dev)
    lo = 0
    for i, c in groups:
        if gens[i] is not None:
            draw_noise(gens[i], c, dev, out=noise[lo : lo + c])
        lo += c
    tok = torch.empty(total, dtype=torch.long, device=dev)
    prob = torch.empty(total, dtype=torch.float64, device=dev)
    per = max(1, CHUNK_BYTES.get(dev.type, CHUNK_BYTES["cuda"]) // (8 * vocab))
    # host reads cost nothing on a CPU; on CUDA the sort-based path keeps the queue full
    cpu = dev.type == "cpu"
    step = CPU_SAMPLE_ROWS if cpu else per
    for lo in range(0, total, per):
        hi = min(total, lo + per)
        lg = out.head(out.h[lo:hi]) if lazy else out[lo:hi]
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            tok[a:b], prob[a:b] = sample_rows(
                lg[a - lo : b - lo], noise[a:b], sp.mask_id, sp.top_p, pruned=cpu
            )
    return tok, prob


def fill(
    x: torch.Tensor,
    conf: torch.Tensor,
    s: int,
    e: int,
    counts: list[int],
    logits_fn: LogitsFn,
    gens: list,
    sp: SamplerSettings,
) -> int:
    """Commit every [MASK] of the window x[:, s:e] (in place, with snapshot confidences in
    `conf`); `counts` holds each row's number of masks there (0 for a placeholder row, whose
    generator may be None). `logits_fn(sel, flat)` returns raw logits (or `RowLogits`) at the
    selected window positions in row-major order: `sel` [b, n] bool, `flat` the same positions
    as flat indices into the window. Returns the number of model calls."""
    b, n = x.shape[0], e - s
    dev = x.device
    rows = torch.arange(b, device=dev)
    counts = list(counts)
    calls = 0
    while True:
        active = [i for i, c in enumerate(counts) if c > 0]
        if not active:
            return calls
        win = x[:, s:e]
        masked = win == sp.mask_id
        if sp.sampler == "first-hitting":
            u = torch.zeros((b, n), dtype=torch.float64, device=dev)
            for i in active:
                torch.rand((n,), generator=gens[i], out=u[i])
            # rows with no mask left pick a dummy position and commit nothing
            pos = torch.where(masked, u, -1.0).argmax(dim=1)
            sel = torch.zeros((b, n), dtype=torch.bool, device=dev).scatter_(1, pos[:, None], True)
            live = [g if c > 0 else None for g, c in zip(gens, counts)]
            tok, p = draw(logits_fn(sel, rows * n + pos), [(i, 1) for i in range(b)], live, sp)
            commit = sel & masked
            x[:, s:e] = torch.where(commit, tok[:, None], win)
            conf[:, s:e] = torch.where(commit, p[:, None], conf[:, s:e])
            for i in active:
                counts[i] -= 1
        else:
            counts = _parallel_step(x, conf, s, e, counts, masked, logits_fn, gens, sp)
        calls += 1


def _parallel_step(
    x,
    conf,
    s: int,
    e: int,
    counts: list[int],
    masked: torch.Tensor,
    logits_fn: LogitsFn,
    gens: list,
    sp: SamplerSettings,
) -> list[int]:
    """One call of the parallel sampler: candidates at every masked position, commit the K most
    confident (or those above the threshold); returns the masks left per row."""
    b, n = x.shape[0], e - s
    dev, win = x.device, x[:, s:e]
    total = sum(counts)
    flat = torch.nonzero_static(masked.reshape(-1), size=total).reshape(-1)
    tok, p = draw(logits_fn(masked, flat), [(i, c) for i, c in enumerate(counts) if c > 0], gens, sp)
    P = torch.full((b * n,), -1.0, dtype=torch.float64, device=dev).index_copy_(0, flat, p).view(b, n)
    T = win.reshape(-1).clone().index_copy_(0, flat, tok).view(b, n)
    if sp.k is not None:
        top = P.topk(min(sp.k, n), dim=1).indices
        commit = torch.zeros_like(masked).scatter_(1, top, True) & masked
    else:
        best = torch.zeros_like(masked).scatter_(1, P.argmax(dim=1, keepdim=True), True)
        commit = masked & ((P >= sp.threshold) | best)
    x[:, s:e] = torch.where(commit, T, win)
    conf[:, s:e] = torch.where(commit, P, conf[:, s:e])
    if sp.k is not None:
        return [c - min(sp.k, c) for c in counts]
    return (x[:, s:e] == sp.mask_id).sum(dim=1).tolist()  # data-dependent: one host sync per call


# ---------------------------------------------------------------------------------- plumbing


def place(model: torch.nn.Module, device: str) -> torch.device:
    if device not in (None, "auto"):
        model.to(resolve_device(device))
    return next(model.parameters()).device


def tokenizer_for(model: Any, tokenizer: Any) -> Any:
    if tokenizer is None:
        from did_cli.io.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(getattr(model.config, "tokenizer", "gpt2"))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise DidError(
            f"tokenizer {getattr(tokenizer, 'name', '?')} has {tokenizer.vocab_size} ids with [MASK], "
            f"the model {model.config.vocab_size}"
        )
    return tokenizer


def model_info(model: Any, tokenizer: Any, model_path: str | None) -> dict:
    c = model.config
    info = {
        "tokenizer": getattr(tokenizer, "name", None),  # what `did show` decodes with
        "fingerprint": getattr(tokenizer, "fingerprint", None),
        "vocab_size": c.vocab_size,
        "mask_id": c.mask_id,
        "length": c.model_length,
    }
    if model_path is not None:
        info["path"] = str(model_path)
    return {k: v for k, v in info.items() if v is not None}


class Progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool, total: int | None, what: str):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)

    def advance(self, n: int = 1, desc: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, **({"description": desc} if desc else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class EvalMode:
    """eval() for the duration, then the previous mode back."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *a):
        self.model.train(self.was)


def autocast(device: torch.device, dtype: str, cache: bool = True):
    """Autocast for the model calls. `cache=False` for compiled or graphed steps: a captured
    graph must not point at cast copies the autocast cache frees later (and their weights are
    cast already, see `fast.low_precision_copy`)."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32", cache_enabled=cache)
