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
from collections.abc import Iterator
from typing import Any

import torch

from did_cli.errors import DidError
from did_cli.sampling.core import (
    DTYPES,
    EvalMode,
    Progress,
    RowLogits,
    SamplerSettings,
    autocast,
    fill,
    make_generator,
    mix_seed,
    model_info,
    place,
    tokenizer_for,
)
from did_cli.sampling.fast import cached_step
from did_cli.sampling.graph import EagerStep, GraphedStep
from did_cli.sampling.prompts import Prompt, resolve_prompts
from did_cli.sampling.sampler_config import ENTROPY_WINDOW, DraftConfig


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

    Records count model calls two ways: `nfe`, the denoising calls (first-hitting: one per
    generated token, BD3-LM's NFE), and `forward_passes`, every call including the KV-cache
    commit pass after each block but the last. A fixed-length sample rejected by the entropy
    check (`DraftConfig.min_entropy`) is redrawn from its generator's current state; the counts
    are those of the accepted draw."""
    mc = model.config
    length = cfg.check(mc.model_length)
    device = place(model, cfg.device)
    tok = tokenizer_for(model, tokenizer)
    prompts = resolve_prompts(cfg, tok, length)
    sp = cfg.settings(mc.mask_id)
    settings = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("n", "device", "allow_longer", "prompts", "prompt_ids", "suffix")
    }
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
            # the last allowed draw under entropy_fail=keep finishes without the check
            checked = [rejections.get(i, 0) < cfg.max_retries or cfg.entropy_fail == "error" for i in idxs]
            results = draft_batch(
                model, cfg, sp, length, rows, [gens[i] for i in idxs], device, bar, checked, step
            )
            retry = []
            for i, pr, res in zip(idxs, rows, results):
                if res is None:
                    rejections[i] = rejections.get(i, 0) + 1
                    if rejections[i] > cfg.max_retries:
                        raise DidError(
                            f"sample draft-{cfg.seed}-{i}: the entropy of its last {ENTROPY_WINDOW} "
                            "tokens fell below "
                            f"--min-entropy {cfg.min_entropy:g} in all {rejections[i]} draws (BD3-LM "
                            "fails here too); "
                            "pass --entropy-fail keep to keep the last draw, or --min-entropy 0 to turn "
                            "the check off"
                        )
                    retry.append(i)
                    continue
                tokens, conf, counts, secs, notes = res
                extra = {
                    **counts,
                    "entropy_rejections": rejections.get(i, 0) if _checking(cfg) else None,
                    **notes,
                }
                if cfg.prompts is not None:
                    extra["prompt_id"] = pr.id
                if pr.suffix:
                    extra["suffix_len"] = len(pr.suffix)
                check_finite_conf(
                    f"sample draft-{cfg.seed}-{i}",
                    conf,
                    min(1 + len(pr.tokens), len(tokens)),
                    len(tokens) - len(pr.suffix or []),
                    cfg.block_size,
                )
                done[i] = _record(
                    tok,
                    f"draft-{cfg.seed}-{i}",
                    tokens,
                    conf,
                    prompt_len=min(1 + len(pr.tokens), len(tokens)),
                    model=info,
                    draft=dict(settings),
                    seconds=round(secs, 4),
                    **extra,
                )
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


def _checking(cfg: DraftConfig) -> bool:
    return bool(cfg.min_entropy)


def check_finite_conf(what: str, conf: list, lo: int, hi: int, block: int | None = None) -> None:
    """A committed position whose probability is NaN or inf means the model's logits were not
    finite there (damaged weights, an overflow): stop naming the sample, position and block."""
    for p in range(lo, hi):
        c = conf[p]
        if c is not None and not math.isfinite(c):
            where = f" (block {p // block} of size {block})" if block else ""
            raise DidError(
                f"{what}: the model gave non-finite logits at position {p}{where}; the weights or "
                "the precision (--dtype) are at fault"
            )


def _record(
    tok: Any, rid: str, tokens: list[int], conf: list[float], prompt_len: int = 1, **extra: Any
) -> dict:
    from did_cli.io.records import make_record

    return make_record(tokens, conf, id=rid, tokenizer=tok, prompt_len=prompt_len, **extra)


def window_entropy(x: torch.Tensor) -> torch.Tensor:
    """Unigram entropy (nats, float64) of each row of token ids x [b, n]."""
    srt = x.sort(dim=1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    counts = torch.zeros(x.shape, dtype=torch.float64, device=x.device).scatter_add_(
        1, new.long().cumsum(1) - 1, torch.ones(x.shape, dtype=torch.float64, device=x.device)
    )
    p = counts / x.shape[1]
    return -(p * p.clamp_min(1e-300).log()).sum(dim=1)


REJECT = -1


def _block_stops(
    cfg: DraftConfig, mc: Any, x: torch.Tensor, is_gen: torch.Tensor, s: int, e: int, checked: list[bool]
) -> tuple[dict[int, int], set[int], set[int]]:
    """Which batch rows stop after block [s, e): ({row: tokens kept, or REJECT}, rows cut by the
    entropy rule, rows that failed an unenforced check). One host sync when a rule applies."""
    stops: dict[int, int] = {}
    cut: set[int] = set()
    low: set[int] = set()
    if cfg.var_length:
        gen = (x[:, s:e] == mc.eos_id) & is_gen[:, s:e]  # an EOS in a prompt does not end it
        hit = gen.any(dim=1).tolist()
        if any(hit):
            firsts = gen.int().argmax(dim=1).tolist()
            stops = {r: s + firsts[r] + 1 for r, h in enumerate(hit) if h}
    if cfg.min_entropy and e > ENTROPY_WINDOW:
        fail = (window_entropy(x[:, e - ENTROPY_WINDOW : e]) < cfg.min_entropy).tolist()
        for r, f in enumerate(fail):
            if not f:
                continue
            if cfg.var_length:  # BD3-LM: drop the last 256 tokens (over an EOS in this block too)
                stops[r] = e - ENTROPY_WINDOW
                cut.add(r)
            elif checked[r]:
                stops[r] = REJECT
            else:
                low.add(r)
    return stops, cut, low


@torch.inference_mode()
def draft_batch(
    model,
    cfg: DraftConfig,
    sp: SamplerSettings,
    L: int,
    prompts: list[Prompt],
    gens: list[torch.Generator],
    device: torch.device,
    bar: Progress | None = None,
    checked: list[bool] | None = None,
    step: Any = None,
) -> list[Any]:
    """Draft one batch (row r continues prompts[r]); returns per sample (tokens, confidences,
    {"nfe", "forward_passes"}, seconds, notes), or None for a fixed-length sample rejected by
    the entropy check (`checked[r]` False: a failure is only noted, as low_entropy). `step`: a
    static-shape cached step (`_fast_step`) of at least this many rows; the batch is padded to
    its rows with placeholder rows that hold no mask.

    Prompt and suffix tokens are written into x before the first call and are never masked, so
    `fill` leaves them alone and a block only waits for its own masks: a prompt ending
    mid-block fixes that block's first positions. Under block-causal attention a block sees the
    blocks before it and itself, so suffix tokens steer only the block(s) that hold them."""
    mc = model.config
    B, b = cfg.block_size, len(prompts)
    t0 = time.perf_counter()
    pad = step.batch - b if step is not None else 0
    x, spans, is_gen = _canvas(mc, prompts, L, device, pad)
    conf = torch.full((b + pad, L), math.nan, dtype=torch.float64, device=device)
    if step is not None:
        step.reset()
    elif cfg.use_cache:
        step = EagerStep(
            model, model.new_cache(b, L, dtype=None if cfg.dtype == "fp32" else DTYPES[cfg.dtype])
        )
    st = _Batch(
        rows=list(range(b)),
        gens=list(gens) + [None] * pad,
        checked=list(checked or [True] * b) + [False] * pad,
    )
    out: list[Any] = [None] * b
    notes: list[dict] = [{} for _ in range(b)]
    n_blocks = L // B
    with EvalMode(model), autocast(device, cfg.dtype, cache=not isinstance(step, GraphedStep)):
        for j in range(n_blocks):
            s, e = j * B, (j + 1) * B
            # masks of each row in this block: its generated positions (BOS, prompt, suffix are fixed);
            # placeholder and retired rows hold none
            counts = [
                max(0, min(e, spans[r][1]) - max(s, spans[r][0])) if r is not None else 0 for r in st.rows
            ] + [0] * pad
            calls = fill(x, conf, s, e, counts, _block_logits(model, x, s, e, B, step), st.gens, sp)
            st.nfe, st.fwd = st.nfe + calls, st.fwd + calls
            stops, cut, low = _block_stops(cfg, mc, x, is_gen, s, e, st.checked)
            live = [r < len(st.rows) and st.rows[r] is not None for r in range(x.shape[0])]
            for r in low:
                if live[r]:
                    notes[st.rows[r]]["low_entropy"] = True
            stops = {r: end for r, end in stops.items() if live[r]}
            if stops:
                x, conf, is_gen = _stop_rows(
                    st, stops, cut, notes, out, x, conf, is_gen, step, time.perf_counter() - t0
                )
                if all(r is None for r in st.rows):
                    break
            if step is not None and j < n_blocks - 1:
                step.commit(x[:, s:e])
                st.fwd += 1
            if bar is not None:
                bar.advance(0, f"draft: block {j + 1}/{n_blocks}")
        else:
            secs = time.perf_counter() - t0
            xs, cs = x[: len(st.rows)].tolist(), conf[: len(st.rows)].tolist()
            for r, i in enumerate(st.rows):
                if i is not None:
                    out[i] = (xs[r], cs[r], {"nfe": st.nfe, "forward_passes": st.fwd}, secs, notes[i])
    return out


@dataclasses.dataclass
class _Batch:
    """Which sample each batch row drafts (None: retired), with its generator and check flag."""

    rows: list
    gens: list
    checked: list
    nfe: int = 0
    fwd: int = 0


def _stop_rows(
    st: _Batch,
    stops: dict[int, int],
    cut: set[int],
    notes: list[dict],
    out: list,
    x,
    conf,
    is_gen,
    step,
    secs: float,
):
    """Finish the rows in `stops` (or drop them, REJECT) and take them out of the batch: sliced
    away where the step can select rows, retired in place (no mask left) under a captured graph,
    whose shapes are fixed."""
    for r, end in stops.items():
        i = st.rows[r]
        if end != REJECT:
            note = dict(notes[i], **({"entropy_truncated": True} if r in cut else {}))
            out[i] = (
                x[r, :end].tolist(),
                conf[r, :end].tolist(),
                {"nfe": st.nfe, "forward_passes": st.fwd},
                secs,
                note,
            )
    if isinstance(step, GraphedStep):
        for r in stops:
            st.rows[r], st.checked[r] = None, False
            x[r, (x[r] == step.model.config.mask_id)] = step.model.config.bos_id
        return x, conf, is_gen
    keep = [r for r in range(len(st.rows)) if r not in stops]
    if not keep:
        st.rows = [None] * len(st.rows)
        return x, conf, is_gen
    kt = torch.tensor(keep, device=x.device)
    if step is not None:
        step.select(kt)
    st.rows, st.gens, st.checked = (
        [st.rows[r] for r in keep],
        [st.gens[r] for r in keep],
        [st.checked[r] for r in keep],
    )
    return x[kt], conf[kt], is_gen[kt]


def _canvas(
    mc: Any, prompts: list[Prompt], L: int, device: torch.device, pad: int = 0
) -> tuple[torch.Tensor, list, torch.Tensor]:
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
