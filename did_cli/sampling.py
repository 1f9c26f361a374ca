"""Drafting (block diffusion + snapshot confidence) and the sampler both stages share.

    from did_cli.sampling import DraftConfig, draft
    from did_cli.refinement import RefineConfig, refine
    drafts = list(draft(model, DraftConfig(n=8, block_size=4)))
    refined = list(refine(model, drafts, RefineConfig(stages=[(None, 0.25)])))

Both are generators of `did.sample/1` records (records.py), yielded as batches finish.

Prompts and suffixes (`DraftConfig.prompts` / `.suffix`) are fixed tokens written into the
sequence before drafting: BOS + prompt at the start, the suffix at the end. They are never
masked, so drafting fills only the positions between them, and refinement re-masks only those
(its ratio counts them alone: records carry `prompt_len` / `suffix_len`).

How one model call turns into committed tokens (`_fill`):
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

Randomness: every sample owns a torch.Generator (seeded from the run seed and the sample index
for drafts, the record id for refinement) that advances only when that sample draws. A sample's
tokens therefore do not depend on the batch it ran in, nor on the KV cache being used (both
paths draw the same shapes in the same order); only floating-point differences in the logits
between batch shapes or precisions can change them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from did_cli.config import ConfigError
from did_cli.errors import DidError
from did_cli.prompts import Prompt, read_prompts, resolve_prompts  # noqa: F401 (re-exported)

SAMPLERS = ("first-hitting", "parallel")
CONFIDENCES = ("snapshot", "posthoc", "random")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENTROPY_WINDOW = 256


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class DraftConfig:
    """Settings of `did draft` (block diffusion, left to right from BOS)."""

    n: int = 16
    """Number of samples to write (per prompt when `prompts` is given)."""
    length: int | None = None
    """Tokens per sample including BOS; None = the model's length L."""
    block_size: int = 4
    """Drafting block size; must divide `length`."""
    sampler: str = "first-hitting"
    """'first-hitting' (one token per model call, BD3-LM) or 'parallel'."""
    tokens_per_step: int | None = None
    """parallel: commit the K most confident masked positions per call."""
    threshold: float | None = None
    """parallel: commit every position whose sampled token has probability >= P (at least one)."""
    top_p: float = 0.9
    """Nucleus mass (1.0 = no filtering)."""
    batch_size: int = 8
    """Samples drafted together."""
    seed: int = 0
    """Run seed; sample i draws from its own generator seeded from (seed, i)."""
    var_length: bool = False
    """End a sample at its first generated EOS (kept); later tokens are dropped."""
    min_entropy: float | None = None
    """Redraw a sample whose last 256 generated tokens have unigram entropy (nats) below this."""
    max_retries: int = 10
    """Redraws per sample under `min_entropy`; after that the last draw is kept."""
    use_cache: bool = True
    """KV cache of committed blocks (False: recompute the whole prefix every call)."""
    device: str = "auto"
    """'auto' keeps the model where it is; otherwise the model is moved there."""
    dtype: str = "fp32"
    """'fp32', or 'bf16'/'fp16' autocast for the model calls (sampling stays float64)."""
    allow_longer: bool = False
    """Allow `length` above the model's trained length (rotary extrapolation)."""
    prompts: list[str | list[int]] | None = None
    """Prompts, each text (encoded with the model's tokenizer) or token ids without BOS. Every
    prompt gets `n` samples: sample i continues prompt i // n, after BOS + the prompt's tokens."""
    prompt_ids: list[str] | None = None
    """Names of the prompts, written as each record's `prompt_id` (default p0, p1, ...)."""
    suffix: str | list[int] | None = None
    """Fixed last tokens of every sample (infilling): text or token ids."""

    def check(self, model_length: int) -> int:
        """Validate against the model; returns the effective length."""
        _check_sampler(self.sampler, self.tokens_per_step, self.threshold, self.top_p)
        if self.prompts is not None and not self.prompts:
            raise ConfigError("--prompt: the list of prompts is empty")
        if self.prompt_ids is not None and len(self.prompt_ids) != len(self.prompts or []):
            raise ConfigError(f"{len(self.prompt_ids)} prompt ids for {len(self.prompts or [])} prompts")
        if self.var_length and self.suffix is not None:
            raise ConfigError("--var-length and --suffix exclude each other (an early end would drop the suffix)")
        for name, v in (("-n", self.n), ("--batch-size", self.batch_size)):
            if v < 1:
                raise ConfigError(f"{name} must be at least 1 (got {v})")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be >= 0 (got {self.max_retries})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        length = model_length if self.length is None else self.length
        if length < 2:
            raise ConfigError(f"--length {length}: need at least 2 (BOS and one token)")
        if length > model_length and not self.allow_longer:
            raise ConfigError(f"--length {length} exceeds the model's length {model_length} (use --allow-longer)")
        if self.block_size < 1 or length % self.block_size:
            raise ConfigError(f"--block-size {self.block_size} does not divide the sequence length {length}")
        return length


def _check_sampler(sampler: str, k: int | None, thr: float | None, top_p: float) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if k is not None and thr is not None:
        raise ConfigError("--tokens-per-step and --threshold are mutually exclusive")
    if sampler == "first-hitting" and (k is not None or thr is not None):
        raise ConfigError("--tokens-per-step/--threshold need --sampler parallel")
    if sampler == "parallel" and k is None and thr is None:
        raise ConfigError("--sampler parallel needs --tokens-per-step K or --threshold P")
    if k is not None and k < 1:
        raise ConfigError(f"--tokens-per-step must be at least 1 (got {k})")
    if thr is not None and not (0.0 < thr <= 1.0):
        raise ConfigError(f"--threshold {thr} outside (0, 1]")
    if not (0.0 < top_p <= 1.0):
        raise ConfigError(f"--top-p {top_p} outside (0, 1]")


# ---------------------------------------------------------------------------------------------
# Sampling primitives
# ---------------------------------------------------------------------------------------------


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


def unigram_entropy(tokens: Iterable[int]) -> float:
    """Entropy (nats) of the token-frequency distribution."""
    counts: dict[int, int] = {}
    n = 0
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
        n += 1
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in counts.values())


@dataclass
class _Sampling:
    sampler: str
    k: int | None
    threshold: float | None
    top_p: float
    mask_id: int


LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fill(
    x: torch.Tensor,
    conf: torch.Tensor,
    s: int,
    e: int,
    counts: list[int],
    logits_fn: LogitsFn,
    gens: list[torch.Generator],
    sp: _Sampling,
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


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    return dev


def _place(model: torch.nn.Module, device: str) -> torch.device:
    if device not in (None, "auto"):
        model.to(resolve_device(device))
    return next(model.parameters()).device


def _tokenizer_for(model: Any, tokenizer: Any) -> Any:
    if tokenizer is None:
        from did_cli.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(getattr(model.config, "tokenizer", "gpt2"))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise DidError(
            f"tokenizer {getattr(tokenizer, 'name', '?')} has {tokenizer.vocab_size} ids with [MASK], "
            f"the model {model.config.vocab_size}"
        )
    return tokenizer


def _model_info(model: Any, tokenizer: Any, model_path: str | None) -> dict:
    c = model.config
    info = {"fingerprint": getattr(tokenizer, "fingerprint", None), "vocab_size": c.vocab_size, "mask_id": c.mask_id, "length": c.model_length}
    if model_path is not None:
        info["path"] = str(model_path)
    return {k: v for k, v in info.items() if v is not None}


class _Progress:
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


class _EvalMode:
    """eval() for the duration, then the previous mode back."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *a):
        self.model.train(self.was)


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


# ---------------------------------------------------------------------------------------------
# Draft
# ---------------------------------------------------------------------------------------------


def draft(
    model: Any,
    cfg: DraftConfig,
    tokenizer: Any = None,
    progress: bool = True,
    model_path: str | None = None,
) -> Iterator[dict]:
    """Draft `cfg.n` samples (per prompt); yields records in sample order as their batches
    finish. With prompts, sample i continues prompt i // n (so a prompt's samples are
    consecutive) and draws from the generator of (seed, i), whatever prompt it belongs to.

    NFEs per sample count every model call its batch made while it was in it: with the cache,
    first-hitting makes one call per generated token plus one commit pass per finished block
    (none after the last block); without the cache, one call per generated token."""
    mc = model.config
    length = cfg.check(mc.model_length)
    device = _place(model, cfg.device)
    tok = _tokenizer_for(model, tokenizer)
    prompts = resolve_prompts(cfg, tok, length)
    sp = _Sampling(cfg.sampler, cfg.tokens_per_step, cfg.threshold, cfg.top_p, mc.mask_id)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("n", "device", "allow_longer", "prompts", "prompt_ids", "suffix")}
    settings["length"] = length
    info = _model_info(model, tok, model_path)
    total = cfg.n * len(prompts)

    gens: dict[int, torch.Generator] = {}
    rejections: dict[int, int] = {}
    queue: deque[int] = deque(range(total))
    done: dict[int, dict] = {}
    next_out = 0
    bar = _Progress(progress, total, "draft")
    try:
        while queue:
            idxs = [queue.popleft() for _ in range(min(cfg.batch_size, len(queue)))]
            for i in idxs:
                if i not in gens:
                    gens[i] = make_generator(mix_seed(cfg.seed, i), device)
            rows = [prompts[i // cfg.n] for i in idxs]
            results = _draft_batch(model, cfg, sp, length, rows, [gens[i] for i in idxs], device, bar)
            retry = []
            for i, pr, (tokens, conf, nfe, secs) in zip(idxs, rows, results):
                lo, hi = 1 + len(pr.tokens), len(tokens) - len(pr.suffix)
                if cfg.min_entropy is not None and rejections.get(i, 0) < cfg.max_retries:
                    if unigram_entropy(tokens[lo:hi][-ENTROPY_WINDOW:]) < cfg.min_entropy:
                        rejections[i] = rejections.get(i, 0) + 1
                        retry.append(i)
                        continue
                extra = {"entropy_rejections": rejections.get(i, 0)} if cfg.min_entropy is not None else {}
                if cfg.prompts is not None:
                    extra["prompt_id"] = pr.id
                if pr.suffix:
                    extra["suffix_len"] = len(pr.suffix)
                done[i] = _record(tok, f"draft-{cfg.seed}-{i}", tokens, conf, prompt_len=lo, model=info,
                                  draft=settings, nfe=nfe, seconds=round(secs, 4), **extra)
                bar.advance(1)
            queue.extendleft(reversed(retry))  # redraw them next, keeping output order
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
    finally:
        bar.close()


def _record(tok: Any, rid: str, tokens: list[int], conf: list[float], prompt_len: int = 1, **extra: Any) -> dict:
    from did_cli.records import make_record

    return make_record(tokens, conf, id=rid, tokenizer=tok, prompt_len=prompt_len, **extra)


@torch.inference_mode()
def _draft_batch(model, cfg: DraftConfig, sp: _Sampling, L: int, prompts: list[Prompt], gens: list[torch.Generator],
                 device: torch.device, bar: _Progress) -> list[tuple[list[int], list[float], int, float]]:
    """Draft one batch (row r continues prompts[r]); returns per sample (tokens, confidences,
    NFEs, seconds).

    Prompt and suffix tokens are written into x before the first call and are never masked, so
    `_fill` leaves them alone and a block only waits for its own masks: a prompt ending
    mid-block fixes that block's first positions. Under block-causal attention a block sees the
    blocks before it and itself, so suffix tokens steer only the block(s) that hold them."""
    mc = model.config
    B = cfg.block_size
    b = len(prompts)
    t0 = time.perf_counter()
    x = torch.full((b, L), mc.mask_id, dtype=torch.long, device=device)
    x[:, 0] = mc.bos_id
    spans = []  # per row, the generated positions [lo, hi)
    for r, pr in enumerate(prompts):
        lo, hi = 1 + len(pr.tokens), L - len(pr.suffix)
        if pr.tokens:
            x[r, 1:lo] = torch.tensor(pr.tokens, dtype=torch.long, device=device)
        if pr.suffix:
            x[r, hi:] = torch.tensor(pr.suffix, dtype=torch.long, device=device)
        spans.append((lo, hi))
    is_gen = torch.zeros((b, L), dtype=torch.bool, device=device)
    for r, (lo, hi) in enumerate(spans):
        is_gen[r, lo:hi] = True
    conf = torch.full((b, L), math.nan, dtype=torch.float64, device=device)
    cache = None
    if cfg.use_cache:
        cache = model.new_cache(b, L, dtype=None if cfg.dtype == "fp32" else DTYPES[cfg.dtype])
    rows = list(range(b))  # batch row -> position in idxs
    gens = list(gens)
    out: list[Any] = [None] * b
    nfe = 0
    n_blocks = L // B
    with _EvalMode(model), _autocast(device, cfg.dtype):
        for j in range(n_blocks):
            s, e = j * B, (j + 1) * B
            if cfg.use_cache:
                def logits_fn(sel, flat, s=s, e=e):
                    lg = model.step(x[:, s:e], cache)
                    return lg.reshape(-1, lg.shape[-1]).index_select(0, flat)
            else:
                def logits_fn(sel, flat, s=s, e=e):
                    full = torch.zeros((x.shape[0], e), dtype=torch.bool, device=device)
                    full[:, s:e] = sel
                    return model(x[:, :e], B, select=full)
            # masks of each row in this block: its generated positions (BOS, prompt, suffix are fixed)
            counts = [max(0, min(e, spans[r][1]) - max(s, spans[r][0])) for r in rows]
            nfe += _fill(x, conf, s, e, counts, logits_fn, gens, sp)
            last = j == n_blocks - 1
            if cfg.var_length and not last:
                gen = (x[:, s:e] == mc.eos_id) & is_gen[:, s:e]  # an EOS in a prompt does not end it
                hit = gen.any(dim=1).tolist()  # one host sync per block
                if any(hit):
                    firsts = gen.int().argmax(dim=1).tolist()
                    secs = time.perf_counter() - t0
                    for r, h in enumerate(hit):
                        if h:
                            end = s + firsts[r] + 1
                            out[rows[r]] = (x[r, :end].tolist(), conf[r, :end].tolist(), nfe, secs)
                    keep = [r for r, h in enumerate(hit) if not h]
                    if not keep:
                        break
                    kt = torch.tensor(keep, device=device)
                    x, conf, is_gen = x[kt], conf[kt], is_gen[kt]
                    if cache is not None:
                        cache.select(kt)
                    rows = [rows[r] for r in keep]
                    gens = [gens[r] for r in keep]
            if cache is not None and not last:
                model.step(x[:, s:e], cache, commit=True, need_logits=False)
                nfe += 1
            bar.advance(0, f"draft: block {j + 1}/{n_blocks}")
        else:
            secs = time.perf_counter() - t0
            xs, cs = x.tolist(), conf.tolist()
            for r in range(len(rows)):
                end = L
                lo = spans[rows[r]][0]
                if cfg.var_length and mc.eos_id in xs[r][lo:]:  # an EOS in the last block
                    end = xs[r].index(mc.eos_id, lo) + 1
                out[rows[r]] = (xs[r][:end], cs[r][:end], nfe, secs)
    return out


__all__ = ["DraftConfig", "draft", "resolve_prompts", "read_prompts", "Prompt", "nucleus", "token_probs",
           "gumbel_argmax", "unigram_entropy", "mix_seed", "resolve_device"]

def __getattr__(name: str) -> Any:
    # refinement lives in did_cli.refinement; `from did_cli.sampling import refine` keeps working
    if name in ("RefineConfig", "refine", "parse_stages", "check_record"):
        from did_cli import refinement

        return getattr(refinement, name)
    raise AttributeError(f"module 'did_cli.sampling' has no attribute {name!r}")
