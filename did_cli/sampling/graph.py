"""CUDA-graph replay of the cached drafting step.

At batch 1 a drafting step is launch-bound: a dozen layers of small kernels cost far more
than reading the weights once. `GraphedStep` captures `DiT.step_static` (static shapes,
positions from a device scalar, no host sync) once per (batch, block length) and replays it.
On a CPU, or when capture fails, it calls the same function eagerly, so results are identical.
"""

from __future__ import annotations

import torch

from did_cli.model import DiT, KVCache


class GraphedStep:
    """Callable `(x_block) -> logits` bound to one model and one cache.

    The cache's buffers must stay where they are while this object lives (no `cache.select`)."""

    def __init__(self, model: DiT, cache: KVCache, batch: int, block: int, use_graph: bool | None = None):
        self.model, self.cache = model, cache
        device = cache.k[0].device
        self.x = torch.zeros(batch, block, dtype=torch.long, device=device)
        self.graph = None
        if use_graph is None:
            use_graph = device.type == "cuda"
        if use_graph:
            self._capture()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        saved = self.cache.start.clone()
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up: kernels chosen, workspaces allocated, caches filled
                self.model.step_static(self.x, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self.out = self.model.step_static(self.x, self.cache)
        self.cache.start.copy_(saved)
        self.graph = graph

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.model.step_static(x, self.cache)
        self.x.copy_(x)
        self.graph.replay()
        return self.out

    @torch.no_grad()
    def commit(self, x: torch.Tensor) -> None:
        """Write the finished block's keys and values and advance the cache past it."""
        self(x)
        n = x.shape[1]
        self.cache.start += n
        self.cache.length += n
