"""The cached drafting step, eager or compiled and replayed as a CUDA graph.

At batch 1 a drafting step is launch-bound: a dozen layers of small kernels cost far more than
reading the weights once. `GraphedStep` runs `DiT.step_static` (static shapes, positions from a
device scalar, no host sync), compiled by inductor where asked (fused kernels), and on CUDA
captures it once per (batch, block length) and replays it. It owns every tensor the graph reads
besides the weights and the cache: the input buffer, the rotary table and the modulations
(`DiT.step_constants`), so nothing a cache elsewhere frees can be under a replay. When
compilation or capture fails it says so in one line and runs the same function without it.
`EagerStep` is the reference: `DiT.step` with a `KVCache`, behind the same interface.
"""

from __future__ import annotations

import torch

from did_cli.core.dit import DiT, KVCache
from did_cli.util import first_line, warn

_COMPILED: set[tuple] = set()
MAX_COMPILED = 6
"""Step shapes compiled per process: each is a graph of one dynamo cache, whose recompile limit
(8 by default) would silently send later shapes to eager code."""


class EagerStep:
    """`DiT.step` on a KVCache: the reference path of drafting and block refinement."""

    path = "eager-cached"
    compiled = False

    def __init__(self, model: DiT, cache: KVCache):
        self.model, self.cache = model, cache
        self.batch = cache.k[0].shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.step(x, self.cache)

    def commit(self, x: torch.Tensor) -> None:
        self.model.step(x, self.cache, commit=True, need_logits=False)

    def reset(self) -> None:
        self.cache.length = 0
        self.cache.start.zero_()

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)
        self.batch = int(rows.numel())


class GraphedStep:
    """Callable `(x_block) -> logits [batch, block, V]` bound to one model and one cache.

    `use_graph` / `compile`: None = on CUDA. Call it under the autocast it was built under
    (with `cache_enabled=False`). The cache's buffers must stay where they are while this
    object lives (no `cache.select`)."""

    def __init__(
        self,
        model: DiT,
        cache: KVCache,
        batch: int,
        block: int,
        use_graph: bool | None = None,
        compile: bool | None = None,
    ):
        self.model, self.cache, self.batch, self.block = model, cache, batch, block
        device = cache.k[0].device
        self.x = torch.zeros(batch, block, dtype=torch.long, device=device)
        self.consts = model.step_constants(cache.capacity, device)
        self.graph, self.out = None, None
        self.fn, self.compiled = model.step_static, False
        if compile if compile is not None else device.type == "cuda":
            self._compile()
        if use_graph if use_graph is not None else device.type == "cuda":
            self._capture()

    @property
    def path(self) -> str:
        return "graph" if self.graph is not None else "static"

    def _compile(self) -> None:
        key = (
            id(self.model),
            self.batch,
            self.block,
            self.cache.capacity,
            self.cache.k[0].dtype,
            torch.get_autocast_dtype(self.x.device.type)
            if torch.is_autocast_enabled(self.x.device.type)
            else None,
        )
        if key not in _COMPILED and len(_COMPILED) >= MAX_COMPILED:
            return
        fn = torch.compile(self.model.step_static, dynamic=False, fullgraph=True)
        try:
            with torch.no_grad():
                fn(self.x, self.cache, self.consts)  # compiles now: a failure is caught here, not mid-draft
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function is correct
            warn(f"compiling the drafting step failed ({first_line(e)}); running it uncompiled")
            return
        _COMPILED.add(key)
        self.fn, self.compiled = fn, True

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):  # warm-up: kernels chosen, workspaces allocated
                    self.fn(self.x, self.cache, self.consts)
            torch.cuda.current_stream().wait_stream(side)
            graph, out = capture(lambda: self.fn(self.x, self.cache, self.consts))
        except Exception as e:  # noqa: BLE001 - whatever broke the capture, the eager step is correct
            warn(
                f"CUDA-graph capture of the drafting step failed ({first_line(e)}); running it without a "
                "graph"
            )
            return
        self.graph, self.out = graph, out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.fn(x, self.cache, self.consts)
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

    def reset(self) -> None:
        """Empty the cache for a new batch (stale keys beyond `start` are masked out)."""
        self.cache.length = 0
        self.cache.start.zero_()


def capture(fn) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output) of `fn()` captured on a private stream. Unlike `torch.cuda.graph`, the
    stream context is left and the capture ended even when `fn` or the end of the capture
    raises: no stream stays capturing, and the caller's stream is back as it was."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream), torch.no_grad():
        graph.capture_begin()
        try:
            out = fn()
        finally:
            graph.capture_end()
    return graph, out
