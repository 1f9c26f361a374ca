"""Drafting: block diffusion left to right from BOS, with the KV cache and snapshot confidence.

    from did_cli.sampling import DraftConfig, draft
    drafts = list(draft(model, DraftConfig(n=8, block_size=4)))

`draft` is a generator of `did.sample/1` records (records.py), yielded in sample order as their
batches finish. Each block is filled by the sampler core (`did_cli.sampling.core.fill`).

Prompts and suffixes (`DraftConfig.prompts` / `.suffix`) are fixed tokens written into the
sequence before drafting: BOS + prompt at the start, the suffix at the end. They are never
masked, so drafting fills only the positions between them, and refinement re-masks only those
(its ratio counts them alone: records carry `prompt_len` / `suffix_len`).

Randomness: sample i draws from the generator of (seed, i), whatever batch it runs in; the
cached and uncached paths draw the same shapes in the same order, so only floating-point
differences in the logits between batch shapes or precisions can change a sample's tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from typing import Any, Iterator

import torch

from did_cli.sampling.config import ENTROPY_WINDOW, DraftConfig
from did_cli.sampling.core import (DTYPES, EvalMode, Progress, RowLogits, SamplerSettings, autocast, fill,
                                   make_generator, mix_seed, model_info, place, tokenizer_for)
from did_cli.sampling.fast import cached_step
from did_cli.sampling.graph import EagerStep, GraphedStep
from did_cli.sampling.prompts import Prompt, resolve_prompts
from did_cli.util import unigram_entropy


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
    device = place(model, cfg.device)
    tok = tokenizer_for(model, tokenizer)
    prompts = resolve_prompts(cfg, tok, length)
    sp = cfg.settings(mc.mask_id)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("n", "device", "allow_longer", "prompts", "prompt_ids", "suffix")}
    settings["length"] = length
    info = model_info(model, tok, model_path)
    total = cfg.n * len(prompts)

    step = _fast_step(model, cfg, min(cfg.batch_size, total), length, device)
    settings["path"] = step.path if step is not None else ("eager-cached" if cfg.use_cache else "uncached")
    if step is not None:
        settings["compiled"] = step.compiled
    gens: dict[int, torch.Generator] = {}
    rejections: dict[int, int] = {}
    queue: deque[int] = deque(range(total))
    done: dict[int, dict] = {}
    next_out = 0
    bar = Progress(progress, total, "draft")
    try:
        while queue:
            idxs = [queue.popleft() for _ in range(min(cfg.batch_size, len(queue)))]
            for i in idxs:
                if i not in gens:
                    gens[i] = make_generator(mix_seed(cfg.seed, i), device)
            rows = [prompts[i // cfg.n] for i in idxs]
            results = draft_batch(model, cfg, sp, length, rows, [gens[i] for i in idxs], device, bar, step)
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
                                  draft=dict(settings), nfe=nfe, seconds=round(secs, 4), **extra)
                bar.advance(1)
            queue.extendleft(reversed(retry))  # redraw them next, keeping output order
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
    finally:
        bar.close()


def _fast_step(model: Any, cfg: DraftConfig, batch: int, length: int, device: torch.device) -> Any:
    """The static-shape cached step every batch of this run shares (batches are padded to
    `batch` rows, so one compiled and captured graph serves them all), or None where the
    reference path runs: no KV cache, early stopping (rows leave the batch), `fast_path` 'off',
    or 'auto' off CUDA."""
    fast = cfg.fast_path == "static" or (cfg.fast_path == "auto" and device.type == "cuda")
    if not (fast and cfg.use_cache and not cfg.var_length):
        return None
    with torch.inference_mode(), EvalMode(model), autocast(device, cfg.dtype, cache=False):
        return cached_step(model, batch, length, cfg.block_size, cfg.dtype, cfg.fast_path)


def _record(tok: Any, rid: str, tokens: list[int], conf: list[float], prompt_len: int = 1, **extra: Any) -> dict:
    from did_cli.records import make_record

    return make_record(tokens, conf, id=rid, tokenizer=tok, prompt_len=prompt_len, **extra)


@torch.inference_mode()
def draft_batch(model, cfg: DraftConfig, sp: SamplerSettings, L: int, prompts: list[Prompt], gens: list[torch.Generator],
                device: torch.device, bar: Progress | None = None, step: Any = None) -> list[tuple[list[int], list[float], int, float]]:
    """Draft one batch (row r continues prompts[r]); returns per sample (tokens, confidences,
    NFEs, seconds). `step`: a static-shape cached step (`_fast_step`) of at least this many
    rows; the batch is padded to its rows with placeholder rows that hold no mask.

    Prompt and suffix tokens are written into x before the first call and are never masked, so
    `fill` leaves them alone and a block only waits for its own masks: a prompt ending
    mid-block fixes that block's first positions. Under block-causal attention a block sees the
    blocks before it and itself, so suffix tokens steer only the block(s) that hold them."""
    mc = model.config
    B = cfg.block_size
    b = len(prompts)
    t0 = time.perf_counter()
    pad = step.batch - b if step is not None else 0
    x, spans, is_gen = _canvas(mc, prompts, L, device, pad)
    conf = torch.full((b + pad, L), math.nan, dtype=torch.float64, device=device)
    if step is not None:
        step.reset()
    elif cfg.use_cache:
        step = EagerStep(model, model.new_cache(b, L, dtype=None if cfg.dtype == "fp32" else DTYPES[cfg.dtype]))
    rows = list(range(b))  # batch row -> position in idxs
    gens = list(gens) + [None] * pad
    out: list[Any] = [None] * b
    nfe = 0
    n_blocks = L // B
    with EvalMode(model), autocast(device, cfg.dtype, cache=not isinstance(step, GraphedStep)):
        for j in range(n_blocks):
            s, e = j * B, (j + 1) * B
            # masks of each row in this block: its generated positions (BOS, prompt, suffix are fixed)
            counts = [max(0, min(e, spans[r][1]) - max(s, spans[r][0])) for r in rows] + [0] * pad
            nfe += fill(x, conf, s, e, counts, _block_logits(model, x, s, e, B, step), gens, sp)
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
                    if step is not None:
                        step.select(kt)
                    rows = [rows[r] for r in keep]
                    gens = [gens[r] for r in keep]
            if step is not None and not last:
                step.commit(x[:, s:e])
                nfe += 1
            if bar is not None:
                bar.advance(0, f"draft: block {j + 1}/{n_blocks}")
        else:
            secs = time.perf_counter() - t0
            xs, cs = x[:len(rows)].tolist(), conf[:len(rows)].tolist()
            for r in range(len(rows)):
                end = L
                lo = spans[rows[r]][0]
                if cfg.var_length and mc.eos_id in xs[r][lo:]:  # an EOS in the last block
                    end = xs[r].index(mc.eos_id, lo) + 1
                out[rows[r]] = (xs[r][:end], cs[r][:end], nfe, secs)
    return out


def _canvas(mc: Any, prompts: list[Prompt], L: int, device: torch.device, pad: int = 0) -> tuple[torch.Tensor, list, torch.Tensor]:
    """The batch before the first call: BOS, each row's prompt and suffix, [MASK] elsewhere;
    with per row the generated positions [lo, hi) and them as a mask. `pad` placeholder rows
    follow, all BOS (no mask: the sampler never touches them)."""
    b = len(prompts)
    x = torch.full((b + pad, L), mc.mask_id, dtype=torch.long, device=device)
    x[:, 0] = mc.bos_id
    x[b:] = mc.bos_id
    is_gen = torch.zeros((b + pad, L), dtype=torch.bool, device=device)
    spans = []
    for r, pr in enumerate(prompts):
        lo, hi = 1 + len(pr.tokens), L - len(pr.suffix)
        if pr.tokens:
            x[r, 1:lo] = torch.tensor(pr.tokens, dtype=torch.long, device=device)
        if pr.suffix:
            x[r, hi:] = torch.tensor(pr.suffix, dtype=torch.long, device=device)
        is_gen[r, lo:hi] = True
        spans.append((lo, hi))
    return x, spans, is_gen


def prefix_bucket(e: int, L: int, B: int) -> int:
    """The length an uncached pass over the prefix [0, e) runs at: e rounded up to a quarter of
    L (a multiple of B). Later blocks cannot influence earlier ones under block-causal
    attention, so the padding changes no logit we read, and a run compiles and builds masks for
    four lengths instead of one per block."""
    q = max(B, (L // 4) // B * B)
    return min(L, -(-e // q) * q)


def _block_logits(model: Any, x: torch.Tensor, s: int, e: int, B: int, step: Any):
    """The `fill` callback of block [s, e): the cached step, or the uncached block-causal pass
    over the prefix (rounded up by `prefix_bucket`). (x is read at call time: rows may leave
    the batch between blocks, but never within one.)"""
    if step is not None:
        def logits_fn(sel, flat):
            lg = step(x[:, s:e])
            return lg.reshape(-1, lg.shape[-1]).index_select(0, flat)
    else:
        def logits_fn(sel, flat):
            n = prefix_bucket(e, x.shape[1], B)
            full = torch.zeros((x.shape[0], n), dtype=torch.bool, device=x.device)
            full[:, s:e] = sel
            return RowLogits(model.hidden(x[:, :n], B)[full], model.logits, model.config.vocab_size)
    return logits_fn
