"""Refinement: re-mask the least confident generated tokens of finished samples and regenerate
them, in one or more stages (block size, ratio); a stage with the full length as its block is the
global bidirectional pass of Diffusion in Diffusion.

    from did_cli.sampling import RefineConfig, refine
    refined = list(refine(model, drafts, RefineConfig(stages=[(None, 0.25)])))

Records in and out are `did.sample/1` (records.py). The sampler of each stage is drafting's
(`did_cli.sampling.core.fill`): same nucleus, Gumbel-max and per-record generators, seeded from
(seed, record id), so a record's result does not depend on the batch it ran in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from did_cli.errors import DidError
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
from did_cli.sampling.passes import RefinePasses
from did_cli.sampling.posthoc import posthoc_confidence
from did_cli.sampling.sampler_config import RefineConfig


def check_record(rec: dict, where: str, mc: Any, tokenizer: Any, cfg: RefineConfig) -> None:
    """Raise DidError when a record cannot be refined by a model of config `mc` (a
    ModelConfig; `where` names the record in messages). Needs no weights, so the CLI runs it
    on a whole input file before loading the model."""
    from did_cli.io.records import validate

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
    lo, hi = _gen_range(rec)
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


def _gen_range(rec: dict) -> tuple[int, int]:
    n = len(rec["tokens"])
    return int(rec.get("prompt_len", 1) or 0), n - int(rec.get("suffix_len", 0) or 0)


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
    tok = tokenizer_for(model, tokenizer)
    sp = cfg.settings(mc.mask_id)
    bar = Progress(progress, None, "refine")
    batch: list[dict] = []
    done = 0

    passes = RefinePasses(model, cfg, device)

    def flush() -> Iterator[dict]:
        nonlocal batch, done
        out, batch = _refine_batch(model, batch, cfg, sp, tok, device, model_path, passes), []
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


def _remask_positions(
    conf_row: list[float], lo: int, hi: int, k: int, mode: str, gen: torch.Generator | None
) -> list[int]:
    """The k generated positions to re-mask: lowest confidence first, ties by lower position."""
    if k <= 0:
        return []
    if mode == "random":
        perm = torch.randperm(hi - lo, generator=gen)[:k]
        return sorted(int(p) + lo for p in perm)
    order = sorted(range(lo, hi), key=lambda p: (conf_row[p], p))
    return sorted(order[:k])


def _refine_batch(
    model,
    recs: list[dict],
    cfg: RefineConfig,
    sp: SamplerSettings,
    tok,
    device,
    model_path: str | None,
    passes: RefinePasses,
) -> list[dict]:
    b, n = len(recs), len(recs[0]["tokens"])
    ranges = [_gen_range(r) for r in recs]
    gens = [make_generator(mix_seed(cfg.seed, r["id"]), device) for r in recs]
    x = torch.tensor([r["tokens"] for r in recs], dtype=torch.long, device=device)
    conf = torch.tensor(
        [[math.nan if c is None else float(c) for c in (r.get("confidence") or [None] * n)] for r in recs],
        dtype=torch.float64,
        device=device,
    )
    stages_out: list[list[dict]] = [[] for _ in recs]
    nfe_total = fwd_total = 0
    t_start = time.perf_counter()
    with torch.inference_mode(), EvalMode(model), autocast(device, cfg.dtype, cache=passes.autocast_cache):
        scoring = 0  # re-scoring passes: forward passes, not denoising NFEs
        if cfg.confidence in ("posthoc", "posthoc-loo"):
            conf, scoring = posthoc_confidence(
                model, x, ranges, cfg.confidence == "posthoc-loo", cfg.batch_size, passes
            )
        for si, (block, ratio) in enumerate(cfg.stages):
            t0 = time.perf_counter()
            before = x.clone()
            remask = _remask(x, conf, ranges, recs, ratio, si, cfg, model.config.mask_id)
            calls, commits = 0, scoring if si == 0 else 0
            B = n if block is None or block >= n else block
            path = "eager"
            if any(remask):
                if B >= n:
                    # global bidirectional pass: full attention over the whole sequence
                    def logits_fn(s_, f_):
                        h, logits_fn.path = passes.global_hidden(x)
                        return RowLogits(h[s_], passes.head, model.config.vocab_size)

                    calls += fill(x, conf, 0, n, [len(p) for p in remask], logits_fn, gens, sp)
                    path = logits_fn.path
                else:
                    step = passes.block_step(b, n, B)
                    denoise, commit = _refine_blocks(step, x, conf, B, remask, gens, sp)
                    calls, commits = calls + denoise, commits + commit
                    path = step.path
            nfe_total, fwd_total = nfe_total + calls, fwd_total + calls + commits
            _check_remasked(conf, remask, recs, si, B)
            changed = (x != before).sum(dim=1).tolist()
            secs = time.perf_counter() - t0
            for i in range(b):
                entry = {
                    "block_size": B,
                    "ratio": ratio,
                    "confidence": cfg.confidence,
                    "remasked": remask[i],
                    "changed": int(changed[i]),
                    "nfe": calls,
                    "forward_passes": calls + commits,
                    "seconds": round(secs, 4),
                    "sampler": cfg.sampler,
                    "top_p": cfg.top_p,
                    "seed": cfg.seed,
                    "path": path,
                }
                if cfg.tokens_per_step is not None:
                    entry["tokens_per_step"] = cfg.tokens_per_step
                if cfg.threshold is not None:
                    entry["threshold"] = cfg.threshold
                if model_path is not None:
                    entry["model"] = str(model_path)
                stages_out[i].append(entry)
        xs, cs = x.tolist(), conf.tolist()
    total_secs = time.perf_counter() - t_start
    out = []
    for i, rec in enumerate(recs):
        lo, hi = ranges[i]
        old = rec.get("confidence") or [None] * n
        new_conf = [cs[i][p] if lo <= p < hi else old[p] for p in range(n)]
        extra = {
            k: v
            for k, v in rec.items()
            if k not in ("schema", "id", "tokens", "confidence", "text", "prompt_len")
        }
        extra["draft_tokens"] = rec.get("draft_tokens") or list(rec["tokens"])
        extra["stages"] = list(rec.get("stages") or []) + stages_out[i]
        extra["nfe"] = int(rec.get("nfe") or 0) + nfe_total
        extra["forward_passes"] = int(rec.get("forward_passes", rec.get("nfe")) or 0) + fwd_total
        extra["seconds"] = round(float(rec.get("seconds") or 0.0) + total_secs, 4)
        out.append(_record_keep(tok, rec, xs[i], new_conf, lo, extra))
    return out


def _check_remasked(conf: torch.Tensor, remask: list[list[int]], recs: list[dict], si: int, B: int) -> None:
    """Every regenerated position must have a finite probability (else the logits were not)."""
    rows = [(i, p) for i, ps in enumerate(remask) for p in ps]
    if not rows:
        return
    vals = conf[[i for i, _ in rows], [p for _, p in rows]]
    bad = (~torch.isfinite(vals)).nonzero()
    if len(bad):
        i, p = rows[int(bad[0])]
        raise DidError(
            f"record {recs[i]['id']!r}: the model gave non-finite logits at position {p} in refine stage "
            f"{si + 1} (block size {B}); the weights or the precision (--dtype) are at fault"
        )


def _remask(x, conf, ranges, recs, ratio: float, si: int, cfg: RefineConfig, mask_id: int) -> list[list[int]]:
    """Choose each record's positions to re-mask in stage `si` and mask them (in place)."""
    b, n = x.shape
    conf_h = conf.tolist()
    remask: list[list[int]] = []
    for i, (lo, hi) in enumerate(ranges):
        k = math.ceil(ratio * (hi - lo) - 1e-9)
        rg = (
            make_generator(mix_seed(cfg.seed, recs[i]["id"], "remask", si), "cpu")
            if cfg.confidence == "random"
            else None
        )
        remask.append(_remask_positions(conf_h[i], lo, hi, k, cfg.confidence, rg))
    sel = torch.zeros((b, n), dtype=torch.bool)
    for i, ps in enumerate(remask):
        sel[i, ps] = True
    sel = sel.to(x.device)
    x[sel] = mask_id
    conf[sel] = math.nan
    return remask


def _record_keep(tok, rec: dict, tokens: list[int], conf: list, lo: int, extra: dict) -> dict:
    from did_cli.io.records import make_record

    r = make_record(tokens, conf, id=rec["id"], tokenizer=tok, prompt_len=lo, **extra)
    if tokens == rec["tokens"] and "text" in rec:
        r["text"] = rec["text"]  # unchanged tokens: keep the text byte for byte
    return r


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
