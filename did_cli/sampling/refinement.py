"""Refinement: re-mask the least confident generated tokens of finished samples and regenerate
them, in one or more stages (block size, ratio); a stage with the full length as its block is the
global bidirectional pass of Diffusion in Diffusion.

    from did_cli.sampling import RefineConfig, refine
    refined = list(refine(model, drafts, RefineConfig(stages=[(None, 0.25)])))

Records in and out are `did.sample/1` (did_cli.io.records makes and checks them). Which tokens a
stage re-masks is `did_cli.sampling.remask.remask_positions`. The sampler of each stage is
drafting's (`did_cli.sampling.core.fill`): same nucleus, Gumbel-max and per-record generators,
seeded from (seed, record id), so a record's result does not depend on the batch it ran in.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from did_cli.errors import DidError
from did_cli.io.records import free_span, refined_record, stage_record, validate
from did_cli.sampling.core import (
    EvalMode,
    Progress,
    RowLogits,
    SamplerSettings,
    autocast,
    fill,
    make_generator,
    mix_seed,
    place,
    tokenizer_for,
)
from did_cli.sampling.fast import resolve_dtype
from did_cli.sampling.passes import RefinePasses
from did_cli.sampling.posthoc import posthoc_confidence
from did_cli.sampling.remask import remask_positions
from did_cli.sampling.sampler_config import RefineConfig


def check_record(rec: dict, where: str, mc: Any, tokenizer: Any, cfg: RefineConfig) -> None:
    """Raise DidError when a record cannot be refined by a model of config `mc` (a
    ModelConfig; `where` names the record in messages). Needs no weights, so the CLI runs it
    on a whole input file before loading the model."""
    validate(rec, vocab_size=mc.vocab_size, need=("id", "tokens"), source=where)
    minfo = rec.get("model")
    if isinstance(minfo, dict):
        v = minfo.get("vocab_size")
        if v is not None and v != mc.vocab_size:
            raise DidError(
                f"{where}: drafted by a model with vocabulary size {v}; this model has {mc.vocab_size}"
            )
        fp, ours = minfo.get("fingerprint"), getattr(tokenizer, "fingerprint", None)
        if fp is not None and ours is not None and fp != ours:
            raise DidError(
                f"{where}: drafted with another tokenizer (fingerprint {fp}, this model's is {ours})"
            )
    tokens = rec["tokens"]
    n = len(tokens)
    if n > mc.model_length and not cfg.allow_longer:
        raise DidError(
            f"{where}: {n} tokens, longer than the model's length {mc.model_length} (use --allow-longer)"
        )
    if n < 1:
        raise DidError(f"{where}: no tokens")
    if mc.mask_id in tokens:
        raise DidError(
            f"{where}: holds [MASK] at position {tokens.index(mc.mask_id)} (not a finished sample)"
        )
    lo, hi = free_span(rec)
    if lo > hi:
        raise DidError(f"{where}: prompt_len + suffix_len exceed the length {n}")
    if cfg.confidence == "snapshot" and any(r > 0 for _, r in cfg.stages):
        conf = rec.get("confidence")
        if conf is None:
            raise DidError(f"{where}: no 'confidence' (use --confidence posthoc or random)")
        for p in range(lo, hi):
            c = conf[p]
            if c is None or not math.isfinite(c):
                raise DidError(f"{where}: no confidence at position {p} (use --confidence posthoc or random)")


def refine(
    model: Any,
    records: Iterable[dict],
    cfg: RefineConfig,
    tokenizer: Any = None,
    progress: bool = True,
    model_path: str | None = None,
) -> Iterator[dict]:
    """Refine records in input order; yields each refined record as its batch finishes.

    Consecutive records of the same length are batched. Each record is checked before its batch
    runs (`check_record`); a bad record raises DidError after the earlier ones were yielded."""
    mc = model.config
    cfg.check(mc.model_length)
    device = place(model, cfg.device)
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device))
    tok = tokenizer_for(model, tokenizer)
    sp = cfg.settings(mc.mask_id)
    bar = Progress(progress, None, "refine")
    batch: list[dict] = []
    done = 0

    passes = RefinePasses(model, cfg, device)

    settings = cfg.record_settings(model_path)

    def flush() -> Iterator[dict]:
        nonlocal batch, done
        res = refine_batch(model, batch, cfg, sp, device, passes)
        out, batch = [_record(rec, i, res, settings, tok) for i, rec in enumerate(batch)], []
        done += len(out)
        bar.advance(len(out), f"refine: {done} records")
        yield from out

    it = iter(records)
    k = 0
    try:
        while True:
            try:
                rec = next(it)
                k += 1
                where = f"record {k} (id {rec.get('id')!r})" if isinstance(rec, dict) else f"record {k}"
                check_record(rec, where, mc, tok, cfg)
            except StopIteration:
                break
            except DidError:
                if batch:  # the records before a bad one are still refined and written
                    yield from flush()
                raise
            if batch and len(rec["tokens"]) != len(batch[0]["tokens"]):
                yield from flush()
            batch.append(rec)
            if len(batch) == cfg.batch_size:
                yield from flush()
        if batch:
            yield from flush()
    finally:
        bar.close()


@dataclass
class StageResult:
    """What one refinement stage did to a batch."""

    block_size: int
    ratio: float
    remasked: list[list[int]]
    """Per row, the positions re-masked and regenerated."""
    changed: list[int]
    """Per row, how many tokens differ after the stage."""
    nfe: int
    """Denoising calls of the stage (the batch's, shared by its rows)."""
    forward_passes: int
    """Every model call of the stage: denoising, cache commits, re-scoring."""
    seconds: float
    path: str
    """Which implementation ran: 'eager', 'graph', 'compiled', ..."""


@dataclass
class BatchResult:
    """A refined batch: tokens and confidences per row, and each stage's figures."""

    tokens: list[list[int]]
    confidence: list[list[float]]
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {
            "nfe": sum(s.nfe for s in self.stages),
            "forward_passes": sum(s.forward_passes for s in self.stages),
        }


def _record(rec: dict, i: int, res: BatchResult, settings: dict, tok: Any) -> dict:
    stages = [
        stage_record(
            s.block_size,
            s.ratio,
            s.remasked[i],
            s.changed[i],
            {"nfe": s.nfe, "forward_passes": s.forward_passes},
            s.seconds,
            s.path,
            settings,
        )
        for s in res.stages
    ]
    return refined_record(rec, res.tokens[i], res.confidence[i], stages, res.counts(), res.seconds, tok)


def refine_batch(
    model: Any,
    recs: list[dict],
    cfg: RefineConfig,
    sp: SamplerSettings,
    device: torch.device,
    passes: RefinePasses,
) -> BatchResult:
    """Refine records of one length together: every stage of `cfg` on their tokens and
    confidences as tensors; returns the new tokens and confidences and each stage's figures."""
    n = len(recs[0]["tokens"])
    spans = [free_span(r) for r in recs]
    gens = [make_generator(mix_seed(cfg.seed, r["id"]), device) for r in recs]
    x = torch.tensor([r["tokens"] for r in recs], dtype=torch.long, device=device)
    conf = torch.tensor(
        [[math.nan if c is None else float(c) for c in (r.get("confidence") or [None] * n)] for r in recs],
        dtype=torch.float64,
        device=device,
    )
    t_start = time.perf_counter()
    stages = []
    with torch.inference_mode(), EvalMode(model), autocast(device, cfg.dtype, cache=passes.autocast_cache):
        scoring = 0  # re-scoring passes: forward passes, not denoising NFEs
        if cfg.confidence in ("posthoc", "posthoc-loo"):
            conf, scoring = posthoc_confidence(
                model, x, spans, cfg.confidence == "posthoc-loo", cfg.batch_size, passes
            )
        for si, (block, ratio) in enumerate(cfg.stages):
            ids = [r["id"] for r in recs]
            stage = _stage(model, x, conf, spans, ids, si, block, ratio, cfg, sp, gens, passes)
            stage.forward_passes += scoring if si == 0 else 0
            stages.append(stage)
        tokens, confidence = x.tolist(), conf.tolist()
    return BatchResult(tokens, confidence, stages, time.perf_counter() - t_start)


def _stage(model, x, conf, spans, ids, si: int, block, ratio: float, cfg: RefineConfig, sp, gens, passes):
    """Stage `si`: re-mask each row's least confident tokens (in place) and regenerate them."""
    b, n = x.shape
    t0 = time.perf_counter()
    before = x.clone()
    remask = _remask(x, conf, spans, ids, ratio, si, cfg, model.config.mask_id)
    calls = commits = 0
    B = n if block is None or block >= n else block
    path = "eager"
    if any(remask):
        if B >= n:
            # global bidirectional pass: full attention over the whole sequence
            ran = []

            def logits_fn(sel, flat):
                h, how = passes.global_hidden(x)
                ran.append(how)
                return RowLogits(h[sel], passes.head, model.config.vocab_size)

            calls = fill(x, conf, 0, n, [len(p) for p in remask], logits_fn, gens, sp)
            path = ran[-1] if ran else path
        else:
            step = passes.block_step(b, n, B)
            calls, commits = _refine_blocks(step, x, conf, B, remask, gens, sp)
            path = step.path
    _check_remasked(conf, remask, ids, si, B)
    changed = (x != before).sum(dim=1).tolist()
    return StageResult(B, ratio, remask, changed, calls, calls + commits, time.perf_counter() - t0, path)


def _check_remasked(conf: torch.Tensor, remask: list[list[int]], ids: list[str], si: int, B: int) -> None:
    """Every regenerated position must have a finite probability (else the logits were not)."""
    rows = [(i, p) for i, ps in enumerate(remask) for p in ps]
    if not rows:
        return
    vals = conf[[i for i, _ in rows], [p for _, p in rows]]
    bad = (~torch.isfinite(vals)).nonzero()
    if len(bad):
        i, p = rows[int(bad[0])]
        raise DidError(
            f"record {ids[i]!r}: the model gave non-finite logits at position {p} in refine stage "
            f"{si + 1} (block size {B}); the weights or the precision (--dtype) are at fault"
        )


def _remask(x, conf, spans, ids, ratio: float, si: int, cfg: RefineConfig, mask_id: int) -> list[list[int]]:
    """Choose each row's positions to re-mask in stage `si` (`remask_positions`) and mask them in
    place (token [MASK], confidence NaN)."""
    b, n = x.shape
    conf_h = conf.tolist()
    remask: list[list[int]] = []
    for i, (lo, hi) in enumerate(spans):
        fixed = [not lo <= p < hi for p in range(n)]
        rg = None
        if cfg.confidence == "random":
            rg = make_generator(mix_seed(cfg.seed, ids[i], "remask", si), "cpu")
        remask.append(remask_positions(conf_h[i], ratio, fixed, cfg.confidence, rg))
    sel = torch.zeros((b, n), dtype=torch.bool)
    for i, ps in enumerate(remask):
        sel[i, ps] = True
    sel = sel.to(x.device)
    x[sel] = mask_id
    conf[sel] = math.nan
    return remask


def _refine_blocks(
    step, x, conf, B: int, remask: list[list[int]], gens, sp: SamplerSettings
) -> tuple[int, int]:
    """Regenerate masked positions block by block, left to right, with the KV cache of `step`
    (`passes.RefinePasses.block_step`): each block sees the earlier (final) blocks and itself.
    Returns (denoising calls, cache-commit passes)."""
    b, n = x.shape
    last_masked = max(max(p) for p in remask if p)
    calls = commits = 0
    for s in range(0, n, B):
        e = min(s + B, n)
        counts = [sum(1 for p in ps if s <= p < e) for ps in remask]
        if any(counts):

            def logits_fn(sel, flat, s=s, e=e):
                lg = step(x[:, s:e])
                return lg.reshape(-1, lg.shape[-1]).index_select(0, flat)

            calls += fill(x, conf, s, e, counts, logits_fn, gens, sp)
        if e > last_masked:
            break  # nothing after this block changes
        step.commit(x[:, s:e])
        commits += 1
    return calls, commits
