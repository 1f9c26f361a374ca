"""One batch of drafts, block by block left to right: the canvas (BOS, prompts, suffixes,
[MASK] elsewhere), the sampler filling each block, the KV-cache commit after it, and rows leaving
the batch when they stop early."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from did_cli.sampling.core import DTYPES, EvalMode, Progress, RowLogits, SamplerSettings, autocast, fill
from did_cli.sampling.graph import EagerStep, GraphedStep
from did_cli.sampling.prompts import Prompt
from did_cli.sampling.sampler_config import DraftConfig
from did_cli.sampling.stopping import REJECT, DeferredEntropy, block_stops


@dataclasses.dataclass
class DraftedSample:
    """One finished draft of a batch."""

    tokens: list[int]
    confidence: list[float]
    """Snapshot confidence per position (NaN where nothing was sampled)."""
    nfe: int
    """Denoising calls of the batch that drafted it."""
    forward_passes: int
    """Every model call of that batch, KV-cache commits included."""
    seconds: float
    notes: dict = dataclasses.field(default_factory=dict)
    """Flags for the record: low_entropy, entropy_truncated."""


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
) -> list[DraftedSample | None]:
    """Draft one batch (row r continues prompts[r]); returns per sample a `DraftedSample`, or
    None for a fixed-length sample rejected by the entropy check (`checked[r]` False: a failure
    is only noted, as low_entropy). `step`: a static-shape cached step (`drafting._fast_step`)
    of at least this many rows; the batch is padded to its rows with placeholder rows that hold
    no mask.

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
    graphed = isinstance(step, GraphedStep)
    # a batch of fixed shape reads the entropy verdicts back in batches, not after every block
    watch = DeferredEntropy(cfg, b + pad, device) if graphed else None
    with EvalMode(model), autocast(device, cfg.dtype, cache=not graphed):
        for j in range(n_blocks):
            s, e = j * B, (j + 1) * B
            # masks of each row in this block: its generated positions (BOS, prompt, suffix are fixed);
            # placeholder and retired rows hold none
            counts = [
                max(0, min(e, spans[r][1]) - max(s, spans[r][0])) if r is not None else 0 for r in st.rows
            ] + [0] * pad
            calls = fill(x, conf, s, e, counts, _block_logits(model, x, s, e, B, step), st.gens, sp)
            st.nfe, st.fwd = st.nfe + calls, st.fwd + calls
            stops, cut, low = _stops_after(cfg, mc, x, is_gen, s, e, j == n_blocks - 1, st, watch)
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
                    out[i] = DraftedSample(xs[r], cs[r], st.nfe, st.fwd, secs, notes[i])
    return out


def _stops_after(cfg, mc, x, is_gen, s: int, e: int, last: bool, st: _Batch, watch: Any):
    """(stops, cut, low) of `block_stops` after block [s, e); with `watch` (a DeferredEntropy)
    the entropy rule reads its verdicts back only when they are due."""
    if watch is None:
        return block_stops(cfg, mc, x, is_gen, s, e, st.checked)
    watch.observe(x, e, s // cfg.block_size, st.gens, st.checked)
    if not watch.due(last):
        return {}, set(), set()
    stops, low = watch.settle(st.gens, st.checked)
    return stops, set(), low


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
            out[i] = DraftedSample(x[r, :end].tolist(), conf[r, :end].tolist(), st.nfe, st.fwd, secs, note)
    if isinstance(step, GraphedStep):
        mc = step.model.config
        for r in stops:
            st.rows[r], st.checked[r] = None, False
            x[r] = torch.where(x[r] == mc.mask_id, mc.bos_id, x[r])  # no mask left; no host sync
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
