"""The sampler core that drafting and refinement share: configuration checks, seeds, nucleus
filtering, Gumbel-max, the fill loop that turns model calls into committed tokens, and the
plumbing around a model call (device, dtype, eval mode, progress).

How one model call turns into committed tokens (`fill`):
- logits -> float64, [MASK] logit -> -inf, softmax, nucleus top-p (BD3-LM's convention: keep the
  tokens whose cumulative probability *including themselves* is <= p, the top token always),
  renormalise; sample by Gumbel-max in float64.
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
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from did_cli.errors import DidError
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


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filter of probabilities [..., V] (BD3-LM): sort descending, keep tokens whose
    cumulative probability including themselves is <= p (the token that crosses p is dropped),
    always keep the top token, renormalise."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(dim=-1) <= top_p
    keep[..., 0] = True
    out = torch.zeros_like(probs).scatter_(-1, idx, sorted_p * keep)
    return out / out.sum(dim=-1, keepdim=True)


def token_probs(logits: torch.Tensor, mask_id: int, top_p: float = 1.0) -> torch.Tensor:
    """Raw logits [..., V] -> float64 probabilities with [MASK] suppressed, nucleus-filtered."""
    lg = logits.to(torch.float64)
    if lg.data_ptr() == logits.data_ptr():
        lg = lg.clone()
    lg[..., mask_id] = -math.inf
    return nucleus(torch.softmax(lg, dim=-1), top_p)


def gumbel_argmax(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """argmax(log p + Gumbel) with Gumbel = -log(-log u), all in float64."""
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return (probs.log() - (-u.log()).log()).argmax(dim=-1)


@dataclass
class SamplerSettings:
    """How one model call's logits become committed tokens (shared by draft and refine)."""

    sampler: str
    k: int | None
    threshold: float | None
    top_p: float
    mask_id: int


LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fill(
    x: torch.Tensor,
    conf: torch.Tensor,
    s: int,
    e: int,
    counts: list[int],
    logits_fn: LogitsFn,
    gens: list[torch.Generator],
    sp: SamplerSettings,
) -> int:
    """Commit every [MASK] of the window x[:, s:e] (in place, with snapshot confidences in
    `conf`); `counts` holds each row's number of masks there. `logits_fn(sel, flat)` returns raw
    logits at the selected window positions in row-major order: `sel` [b, n] bool, `flat` the
    same positions as flat indices into the window. Returns the number of model calls."""
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
            probs = token_probs(logits_fn(sel, rows * n + pos), sp.mask_id, sp.top_p)  # [b, V]
            g = torch.zeros_like(probs)
            for i in active:
                torch.rand(probs.shape[1:], generator=gens[i], out=g[i])
            tok = gumbel_argmax(probs, g)
            p = probs.gather(1, tok[:, None])
            commit = sel & masked
            x[:, s:e] = torch.where(commit, tok[:, None], win)
            conf[:, s:e] = torch.where(commit, p, conf[:, s:e])
            for i in active:
                counts[i] -= 1
        else:
            total = sum(counts)
            flat = torch.nonzero_static(masked.reshape(-1), size=total).reshape(-1)
            probs = token_probs(logits_fn(masked, flat), sp.mask_id, sp.top_p)  # [N, V]
            g = torch.empty_like(probs)
            off = 0
            for i, c in enumerate(counts):  # rows are contiguous in row-major order
                if c > 0:
                    torch.rand((c, probs.shape[1]), generator=gens[i], out=g[off:off + c])
                    off += c
            tok = gumbel_argmax(probs, g)
            p = probs.gather(1, tok[:, None]).reshape(-1)
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
                counts = [c - min(sp.k, c) for c in counts]
            else:  # data-dependent: one host sync per call
                counts = (x[:, s:e] == sp.mask_id).sum(dim=1).tolist()
        calls += 1


# ---------------------------------------------------------------------------------- plumbing


def place(model: torch.nn.Module, device: str) -> torch.device:
    if device not in (None, "auto"):
        model.to(resolve_device(device))
    return next(model.parameters()).device


def tokenizer_for(model: Any, tokenizer: Any) -> Any:
    if tokenizer is None:
        from did_cli.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(getattr(model.config, "tokenizer", "gpt2"))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise DidError(
            f"tokenizer {getattr(tokenizer, 'name', '?')} has {tokenizer.vocab_size} ids with [MASK], "
            f"the model {model.config.vocab_size}"
        )
    return tokenizer


def model_info(model: Any, tokenizer: Any, model_path: str | None) -> dict:
    c = model.config
    info = {"fingerprint": getattr(tokenizer, "fingerprint", None), "vocab_size": c.vocab_size, "mask_id": c.mask_id, "length": c.model_length}
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

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=True)
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


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
