"""Drafting: block diffusion left to right from BOS, with the KV cache and snapshot confidence.

    from did_cli.sampling import DraftConfig, draft
    drafts = list(draft(model, DraftConfig(n=8, block_size=4)))

`draft` is a generator of `did.sample/1` records (did_cli.io.records makes them), yielded in
sample order as their batches finish. A batch is drafted by `drafting_batch.draft_batch`; each
block is filled by the sampler core (`did_cli.sampling.core.fill`).

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
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from did_cli.errors import DidError
from did_cli.io.records import make_record
from did_cli.sampling.core import (
    EvalMode,
    Progress,
    autocast,
    make_generator,
    mix_seed,
    model_info,
    place,
    tokenizer_for,
)
from did_cli.sampling.drafting_batch import DraftedSample, draft_batch
from did_cli.sampling.fast import cached_step, resolve_dtype
from did_cli.sampling.prompts import Prompt, resolve_prompts
from did_cli.sampling.sampler_config import ENTROPY_WINDOW, DraftConfig
from did_cli.sampling.stopping import check_finite_conf

NOT_RECORDED = ("n", "device", "allow_longer", "prompts", "prompt_ids", "suffix")
"""DraftConfig fields a record's `draft` settings leave out (they say nothing about the sample)."""


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
    run = _DraftRun(model, cfg, tokenizer, model_path)
    bar = Progress(progress, run.total, "draft")
    try:
        yield from run.records(bar)
    finally:
        bar.close()


class _DraftRun:
    """The state of one `draft` call: which samples wait, their generators and redraw counts,
    and the finished records held until their turn to be yielded."""

    def __init__(self, model: Any, cfg: DraftConfig, tokenizer: Any, model_path: str | None):
        mc = model.config
        self.length = cfg.check(mc.model_length)
        self.device = place(model, cfg.device)
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, self.device))
        self.model, self.cfg = model, cfg
        self.tok = tokenizer_for(model, tokenizer)
        self.prompts = resolve_prompts(cfg, self.tok, self.length)
        self.sp = cfg.settings(mc.mask_id)
        self.info = model_info(model, self.tok, model_path)
        self.total = cfg.n * len(self.prompts)
        self.step = _fast_step(model, cfg, min(cfg.batch_size, self.total), self.length, self.device)
        self.settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RECORDED}
        self.settings["length"] = self.length
        self.settings["path"] = self.step.path if self.step is not None else _eager_path(cfg)
        if self.step is not None:
            self.settings["compiled"] = self.step.compiled
        self.gens: dict[int, torch.Generator] = {}
        self.rejections: dict[int, int] = {}

    def records(self, bar: Progress) -> Iterator[dict]:
        cfg = self.cfg
        queue: deque[int] = deque(range(self.total))
        done: dict[int, dict] = {}
        next_out = 0
        while queue:
            idxs = [queue.popleft() for _ in range(min(cfg.batch_size, len(queue)))]
            rows = [self.prompts[i // cfg.n] for i in idxs]
            retry = []
            for i, pr, res in zip(idxs, rows, self._batch(idxs, rows, bar)):
                if res is None:
                    self._rejected(i)
                    retry.append(i)
                    continue
                done[i] = self._record(i, pr, res)
                bar.advance(1)
            queue.extendleft(reversed(retry))  # redraw them next, keeping output order
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _batch(self, idxs: list[int], rows: list[Prompt], bar: Progress) -> list[DraftedSample | None]:
        cfg = self.cfg
        for i in idxs:
            if i not in self.gens:
                self.gens[i] = make_generator(mix_seed(cfg.seed, i), self.device)
        # the last allowed draw under entropy_fail=keep finishes without the check
        checked = [self.rejections.get(i, 0) < cfg.max_retries or cfg.entropy_fail == "error" for i in idxs]
        gens = [self.gens[i] for i in idxs]
        return draft_batch(
            self.model, cfg, self.sp, self.length, rows, gens, self.device, bar, checked, self.step
        )

    def _rejected(self, i: int) -> None:
        cfg = self.cfg
        self.rejections[i] = self.rejections.get(i, 0) + 1
        if self.rejections[i] > cfg.max_retries:
            raise DidError(
                f"sample draft-{cfg.seed}-{i}: the entropy of its last {ENTROPY_WINDOW} tokens fell below "
                f"--min-entropy {cfg.min_entropy:g} in all {self.rejections[i]} draws (BD3-LM fails here "
                "too); pass --entropy-fail keep to keep the last draw, or --min-entropy 0 to turn the check "
                "off"
            )

    def _record(self, i: int, pr: Prompt, res: DraftedSample) -> dict:
        cfg, n = self.cfg, len(res.tokens)
        rid = f"draft-{cfg.seed}-{i}"
        prompt_len = min(1 + len(pr.tokens), n)
        check_finite_conf(
            f"sample {rid}", res.confidence, prompt_len, n - len(pr.suffix or []), cfg.block_size
        )
        return make_record(
            res.tokens,
            res.confidence,
            id=rid,
            tokenizer=self.tok,
            prompt_len=prompt_len,
            model=self.info,
            draft=dict(self.settings),
            seconds=round(res.seconds, 4),
            nfe=res.nfe,
            forward_passes=res.forward_passes,
            entropy_rejections=self.rejections.get(i, 0) if cfg.min_entropy else None,
            prompt_id=pr.id if cfg.prompts is not None else None,
            suffix_len=len(pr.suffix) if pr.suffix else None,
            **res.notes,
        )


def _eager_path(cfg: DraftConfig) -> str:
    return "eager-cached" if cfg.use_cache else "uncached"


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
