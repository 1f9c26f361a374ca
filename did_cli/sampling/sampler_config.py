"""Settings of `did draft` and `did refine` (no torch import: the CLI reads them for --help).

`SamplerConfig` holds what both stages share; `DraftConfig` and `RefineConfig` add their own.
Each `check` raises UsageError naming the flag, before any weights are loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from did_cli.core.model_config import FULL_LENGTH, parse_block_size
from did_cli.errors import UsageError

SAMPLERS = ("first-hitting", "parallel")
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
FAST_PATHS = ("auto", "off", "static")
ENTROPY_WINDOW = 256
"""Tokens of the entropy check (BD3-LM): the last 256, checked once more than 256 exist."""
ENTROPY_FAIL = ("error", "keep")


@dataclass
class SamplerConfig:
    """Settings shared by `did draft` and `did refine`."""

    sampler: str = "first-hitting"
    """'first-hitting' (one token per model call, BD3-LM) or 'parallel'."""
    tokens_per_step: int | None = None
    """parallel: commit the K most confident masked positions per call."""
    threshold: float | None = None
    """parallel: commit every position whose sampled token has probability >= P (at least one)."""
    top_p: float = 0.9
    """Nucleus mass (1.0 = no filtering)."""
    batch_size: int = 8
    """Samples processed together."""
    seed: int = 0
    """Run seed; every sample draws from its own generator seeded from it."""
    device: str = "auto"
    """'auto' keeps the model where it is; otherwise the model is moved there (cpu, cuda, cuda:N)."""
    dtype: str = "auto"
    """Precision of the model calls: 'auto' (bf16 on a CUDA device that supports it, else
    fp32), 'fp32', or 'bf16'/'fp16' autocast. Sampling (softmax, nucleus, Gumbel-max) stays
    float64 either way, so a lower precision only rounds the logits; records say which ran."""
    allow_longer: bool = False
    """Allow sequences longer than the model's trained length (rotary extrapolation)."""
    fast_path: str = "auto"
    """Model calls: 'auto' (on CUDA the cached step compiled and replayed as a CUDA graph, the
    global refine pass compiled), 'off' (the eager reference path), or 'static' (the graph
    path's static-shape step run eagerly, on any device). Records say which ran."""

    def check_sampling(self) -> None:
        check_sampler(self.sampler, self.tokens_per_step, self.threshold, self.top_p)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.dtype not in DTYPE_NAMES:
            raise UsageError(f"--dtype {self.dtype!r}: choose from {', '.join(DTYPE_NAMES)}")
        if self.fast_path not in FAST_PATHS:
            raise UsageError(f"--fast-path {self.fast_path!r}: choose from {', '.join(FAST_PATHS)}")

    def settings(self, mask_id: int) -> Any:
        """The `core.SamplerSettings` of a model whose [MASK] id is `mask_id`."""
        from did_cli.sampling.core import SamplerSettings

        return SamplerSettings(self.sampler, self.tokens_per_step, self.threshold, self.top_p, mask_id)


def check_sampler(sampler: str, k: int | None, thr: float | None, top_p: float) -> None:
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if k is not None and thr is not None:
        raise UsageError("--tokens-per-step and --threshold are mutually exclusive")
    if sampler == "first-hitting" and (k is not None or thr is not None):
        raise UsageError("--tokens-per-step/--threshold need --sampler parallel")
    if sampler == "parallel" and k is None and thr is None:
        raise UsageError("--sampler parallel needs --tokens-per-step K or --threshold P")
    if k is not None and k < 1:
        raise UsageError(f"--tokens-per-step must be at least 1 (got {k})")
    if thr is not None and not (0.0 < thr <= 1.0):
        raise UsageError(f"--threshold {thr} outside (0, 1]")
    if not (0.0 < top_p <= 1.0):
        raise UsageError(f"--top-p {top_p} outside (0, 1]")


@dataclass
class DraftConfig(SamplerConfig):
    """Settings of `did draft` (block diffusion, left to right from BOS)."""

    n: int = 16
    """Number of samples to write (per prompt when `prompts` is given)."""
    length: int | None = None
    """Tokens per sample including BOS; None = the model's length L."""
    block_size: int = 4
    """Drafting block size; must divide `length`."""
    var_length: bool = False
    """End a sample at its first generated EOS (kept); later tokens are dropped."""
    min_entropy: float | None = 4.0
    """BD3-LM's entropy check: after every block, once the sample holds more than 256 tokens,
    the unigram entropy (nats) of its last 256 tokens must be at least this; else a fixed-length
    sample is redrawn and a variable-length one is cut before those 256 tokens. Samples of at
    most 256 tokens are never checked. 0 (or None) turns it off."""
    max_retries: int = 10
    """Redraws of a fixed-length sample that fails the entropy check; then `entropy_fail`."""
    entropy_fail: str = "error"
    """When every draw of a fixed-length sample fails the check: 'error' (BD3-LM: sampling
    fails) or 'keep' (the last draw, finished without the check, marked low_entropy)."""
    use_cache: bool = True
    """KV cache of committed blocks (False: recompute the whole prefix every call)."""
    prompts: list[str | list[int]] | None = None
    """Prompts, each text (encoded with the model's tokenizer) or token ids without BOS. Every
    prompt gets `n` samples: sample i continues prompt i // n, after BOS + the prompt's tokens."""
    prompt_ids: list[str] | None = None
    """Names of the prompts, written as each record's `prompt_id` (default p0, p1, ...)."""
    suffix: str | list[int] | None = None
    """Fixed last tokens of every sample (infilling): text or token ids."""

    def check(self, model_length: int) -> int:
        """Validate against the model; returns the effective length."""
        self.check_sampling()
        if self.prompts is not None and not self.prompts:
            raise UsageError("--prompt: the list of prompts is empty")
        if self.prompt_ids is not None and len(self.prompt_ids) != len(self.prompts or []):
            raise UsageError(f"{len(self.prompt_ids)} prompt ids for {len(self.prompts or [])} prompts")
        if self.var_length and self.suffix is not None:
            raise UsageError(
                "--var-length and --suffix exclude each other (an early end would drop the suffix)"
            )
        if self.n < 1:
            raise UsageError(f"-n must be at least 1 (got {self.n})")
        if self.max_retries < 0:
            raise UsageError(f"--max-retries must be >= 0 (got {self.max_retries})")
        if self.min_entropy is not None and not (self.min_entropy >= 0 and math.isfinite(self.min_entropy)):
            raise UsageError(f"--min-entropy {self.min_entropy}: must be a finite number >= 0")
        if self.entropy_fail not in ENTROPY_FAIL:
            raise UsageError(f"--entropy-fail {self.entropy_fail!r}: choose from {', '.join(ENTROPY_FAIL)}")
        length = model_length if self.length is None else self.length
        if length < 2:
            raise UsageError(f"--length {length}: need at least 2 (BOS and one token)")
        if length > model_length and not self.allow_longer:
            raise UsageError(
                f"--length {length} exceeds the model's length {model_length} (use --allow-longer)"
            )
        if self.block_size < 1 or length % self.block_size:
            raise UsageError(f"--block-size {self.block_size} does not divide the sequence length {length}")
        return length


CONFIDENCES = ("snapshot", "posthoc", "posthoc-loo", "random")


@dataclass
class RefineConfig(SamplerConfig):
    """Settings of `did refine` (re-mask the least confident tokens and regenerate them)."""

    stages: list[tuple[int | None, float]] = field(default_factory=lambda: [(None, 0.25)])
    """(block size, ratio) per stage, in order; block None (or >= length) = global pass."""
    confidence: str = "snapshot"
    """Which tokens to re-mask: 'snapshot' (recorded at commit), 'posthoc' (one re-scoring pass
    of the finished draft before stage 1: p(x_i | whole draft)), 'posthoc-loo' (leave one out:
    p(x_i | the draft with x_i masked), one masked position per row, batched), 'random'
    (uniform, seeded)."""

    def check(self, model_length: int) -> None:
        """UsageError naming the option at fault, for a model of length `model_length`. Checked
        once per length: the CLI checks before loading the weights, so the check `refine` makes
        again for a Python caller costs nothing."""
        if getattr(self, "_checked_for", None) == model_length:
            return
        self.check_sampling()
        if self.confidence not in CONFIDENCES:
            raise UsageError(f"--confidence {self.confidence!r}: choose from {', '.join(CONFIDENCES)}")
        if not self.stages:
            raise UsageError("--stages: at least one stage is needed")
        for b, r in self.stages:
            if not (0.0 <= r <= 1.0) or not math.isfinite(r):
                raise UsageError(f"--stages: ratio {r} outside [0, 1]")
            if b is not None:
                if b < 1:
                    raise UsageError(f"--stages: block size {b} must be positive")
                if b < model_length and model_length % b:
                    raise UsageError(
                        f"--stages: block size {b} does not divide the sequence length {model_length}"
                    )
        self._checked_for = model_length

    def record_settings(self, model_path: str | None = None) -> dict[str, Any]:
        """The settings each refined record's stages carry (None values are left out)."""
        return {
            "confidence": self.confidence,
            "sampler": self.sampler,
            "top_p": self.top_p,
            "seed": self.seed,
            "tokens_per_step": self.tokens_per_step,
            "threshold": self.threshold,
            "dtype": self.dtype,
            "model": None if model_path is None else str(model_path),
        }


def format_stages(stages: list[tuple[int | None, float]]) -> str:
    """[(None, 0.25)] -> 'L:0.25': stages as --stages writes them (the inverse of parse_stages)."""
    return ",".join(f"{FULL_LENGTH if b is None else b}:{r:g}" for b, r in stages)


def parse_stages(text: str, flag: str = "--stages") -> list[tuple[int | None, float]]:
    """'64:0.3,L:0.2' -> [(64, 0.3), (None, 0.2)]; a block of L (or length, any case) means the
    full length, as in --block-sizes."""
    stages: list[tuple[int | None, float]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        b, sep, r = part.partition(":")
        if not sep:
            raise UsageError(f"{flag} {part!r}: expected BLOCK:RATIO (e.g. 1024:0.25 or L:0.25)")
        if not b.strip():
            raise UsageError(f"{flag} {part!r}: expected BLOCK:RATIO (e.g. 1024:0.25 or L:0.25)")
        block = parse_block_size(b, flag)
        try:
            ratio = float(r)
        except ValueError:
            raise UsageError(f"{flag} {part!r}: expected BLOCK:RATIO (e.g. 1024:0.25 or L:0.25)") from None
        stages.append((None if block == FULL_LENGTH else block, ratio))
    if not stages:
        raise UsageError(f"{flag}: empty list")
    return stages
