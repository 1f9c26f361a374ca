"""The model calls of one `did refine` run: the global pass and the cached step of block stages,
on the fast path where it applies (`SamplerConfig.fast_path`).

- global pass (a stage whose block is the whole sequence, and post-hoc confidence): on CUDA
  with 'auto', the embedding and transformer blocks compiled at one fixed shape, (batch size,
  model length): a smaller batch is padded with placeholder rows (rows do not see each other),
  other lengths run eagerly. The output layer is applied later, chunk by chunk, to the rows
  the sampler needs (`core.RowLogits`).
- block stages: the cached step of drafting (`fast.cached_step`), one per (length, block) with
  `batch_size` rows, reused by every batch (a smaller last batch runs padded).
Both run the bf16 weight copy (`fast.low_precision_copy`) when the dtype is not fp32: under
autocast it computes what the float32 weights do, without casting them inside every call.
"""

from __future__ import annotations

from typing import Any

import torch

from did_cli.sampling.core import DTYPES
from did_cli.sampling.fast import cached_step, low_precision_copy
from did_cli.sampling.sampler_config import RefineConfig
from did_cli.util import first_line, warn


class RefinePasses:
    def __init__(self, model: Any, cfg: RefineConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.fast = cfg.fast_path == "static" or (cfg.fast_path == "auto" and device.type == "cuda")
        self.net = model
        if self.fast and cfg.dtype != "fp32":
            self.net = low_precision_copy(model, DTYPES[cfg.dtype])
        self.compiled = None
        if cfg.fast_path == "auto" and device.type == "cuda":
            self.compiled = self.net.compiled_blocks()
        self.steps: dict[tuple[int, int, int], Any] = {}

    @property
    def autocast_cache(self) -> bool:
        """Whether the autocast cache may be on (not around compiled or captured calls)."""
        return not self.fast

    def global_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Hidden states [b, n, D] of the unmasked pass over x [b, n], and the path that ran."""
        b, n = x.shape
        bs, length = self.cfg.batch_size, self.model.config.model_length
        if self.compiled is None or n != length or b > bs:
            return self.net.hidden(x), "eager"
        if b < bs:  # placeholder rows: one compiled shape for every batch of the run
            x = torch.cat([x, x[:1].expand(bs - b, n)])
        try:
            return self.net.hidden(x, run=self.compiled)[:b], "compiled"
        except Exception as e:  # noqa: BLE001 - a compiler failure: the eager pass is correct
            warn(f"compiling the global refine pass failed ({first_line(e)}); running it uncompiled")
            self.compiled = None
            return self.net.hidden(x[:b]), "eager"

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Raw logits of hidden states (the output layer of the model that made them)."""
        return self.net.logits(h)

    def block_step(self, b: int, n: int, block: int) -> Any:
        """The cached step of a block stage over [b, n] (reset, ready for a new batch). On the
        fast path one step per (n, block) serves every batch: it has `batch_size` rows, and a
        smaller batch runs padded, so the last one compiles and captures nothing new."""
        if not (self.fast and n % block == 0):
            step = cached_step(self.model, b, n, block, self.cfg.dtype, "off")
        else:
            key = (max(b, self.cfg.batch_size), n, block)
            step = self.steps.get(key)
            if step is None:
                step = self.steps[key] = cached_step(
                    self.model, key[0], n, block, self.cfg.dtype, self.cfg.fast_path, net=self.net
                )
        step.reset()
        return step
