"""The cached drafting step, eager or compiled and replayed as a CUDA graph.

At batch 1 a drafting step is launch-bound: a dozen layers of small kernels cost far more than
reading the weights once. `GraphedStep` runs the model's `step_static` (static shapes, positions
from a device scalar, no host sync), compiled by inductor where asked (fused kernels), and on
CUDA captures it once per (batch, block length) and replays it: one graph for the denoising
call, one for the commit pass (no output layer). It owns every tensor the graphs read besides
the weights and the cache: the input buffer, the rotary table and the modulations
(`step_constants`), so nothing a cache elsewhere frees can be under a replay. After a capture it
checks that a replay computes (the output poisoned, replayed, compared with the eager step).
Whatever fails (compile, capture, that check) says so in one line and runs the same function
without it. `EagerStep` is the reference: the model's `step` with a `KVCache`, behind the same
interface.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch

from did_cli.util import first_line, warn

_COMPILED: set[tuple] = set()
MAX_COMPILED = 32
"""Step shapes compiled per process. A `did draft` or `did refine` run needs one per batch shape
and block stage; the cap bounds the compile time and memory of a session that builds many (a
test run, a benchmark). A shape past it runs uncompiled, with one warning line."""


BACKEND = "inductor"
"""The torch.compile backend of the step (tests use "eager": dynamo's caching without codegen)."""


def compiled_shapes() -> int:
    """How many step shapes this process compiled (counted against `MAX_COMPILED`)."""
    return len(_COMPILED)


def forget_compiled() -> None:
    """Reset the count, e.g. after `torch._dynamo.reset()` dropped the compiled code."""
    _COMPILED.clear()


def _logits_step(model: Any, x: torch.Tensor, cache: Any, consts: Any) -> torch.Tensor:
    return model.step_static(x, cache, consts)


def _commit_step(model: Any, x: torch.Tensor, cache: Any, consts: Any) -> None:
    model.step_static(x, cache, consts, need_logits=False)


def on_device(device: torch.device):
    """`device` made current (a CUDA stream or graph belongs to the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class EagerStep:
    """The model's `step` on a KVCache: the reference path of drafting and block refinement."""

    path = "eager-cached"
    compiled = False

    def __init__(self, model: Any, cache: Any):
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
    """Callable `(x_block) -> logits [b, block, V]` bound to one model and one cache of `batch`
    rows; a call with b < batch rows runs padded (the other rows compute what they held before
    and are not returned), so a smaller last batch reuses the compiled and captured shapes.

    `use_graph` / `compile`: None = on CUDA. Every call runs under inference mode; call it
    under the autocast it was built under (with `cache_enabled=False`). The cache's buffers must
    stay where they are while this object lives (no `cache.select`)."""

    def __init__(
        self,
        model: Any,
        cache: Any,
        batch: int,
        block: int,
        use_graph: bool | None = None,
        compile: bool | None = None,
    ):
        self.model, self.cache, self.batch, self.block = model, cache, batch, block
        self.device = cache.k[0].device
        self.graph = self.commit_graph = self.out = None
        self.fn = model.step_static
        self.commit_fn = functools.partial(model.step_static, need_logits=False)
        self.compiled = False
        with on_device(self.device), torch.inference_mode():
            self.x = torch.zeros(batch, block, dtype=torch.long, device=self.device)
            self.consts = model.step_constants(cache.capacity, self.device)
            if compile if compile is not None else self.device.type == "cuda":
                self._compile()
            if use_graph if use_graph is not None else self.device.type == "cuda":
                self._capture()

    @property
    def path(self) -> str:
        return "graph" if self.graph is not None else "static"

    def _key(self) -> tuple:
        """What dynamo specialises the step on (not the model object: instances share code)."""
        kind = self.device.type
        amp = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        weights = tuple(sorted({str(p.dtype) for p in self.model.parameters()}))
        cache = (self.cache.capacity, str(self.cache.k[0].dtype))
        return (repr(self.model.config), weights, self.batch, self.block, *cache, str(amp), str(self.device))

    def _compile(self) -> None:
        key = self._key()
        if key not in _COMPILED and len(_COMPILED) >= MAX_COMPILED:
            warn(
                f"the drafting step of batch {self.batch}, block {self.block} runs uncompiled: this process "
                f"compiled {MAX_COMPILED} step shapes already (did_cli.sampling.graph.MAX_COMPILED)"
            )
            return
        opts = dict(dynamic=False, fullgraph=True, backend=BACKEND)
        fn = functools.partial(torch.compile(_logits_step, **opts), self.model)
        commit = functools.partial(torch.compile(_commit_step, **opts), self.model)
        # each shape is one more graph of the same code: dynamo's recompile limit (8) would send
        # later shapes to eager code without a word, so it is raised while this one compiles
        limit = max(torch._dynamo.config.recompile_limit, 2 * MAX_COMPILED + 8)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                fn(self.x, self.cache, self.consts)  # compiles now: a failure is caught here, not mid-draft
                commit(self.x, self.cache, self.consts)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function is correct
            warn(f"compiling the drafting step failed ({first_line(e)}); running it uncompiled")
            return
        _COMPILED.add(key)
        self.fn, self.commit_fn, self.compiled = fn, commit, True

    def _capture(self) -> None:
        try:
            graph, out = capture(lambda: self.fn(self.x, self.cache, self.consts), self.device)
            commit_graph, _ = capture(lambda: self.commit_fn(self.x, self.cache, self.consts), self.device)
            self.graph, self.commit_graph, self.out = graph, commit_graph, out
            problem = self._self_check()
        except Exception as e:  # noqa: BLE001 - whatever broke the capture, the eager step is correct
            self.graph = self.commit_graph = self.out = None
            warn(
                f"CUDA-graph capture of the drafting step failed ({first_line(e)}); running it without a "
                "graph"
            )
            return
        if problem:
            self.graph = self.commit_graph = self.out = None
            warn(
                f"the CUDA graph of the drafting step does not compute ({problem}); running it without a "
                "graph"
            )

    def _self_check(self) -> str | None:
        """Replay both graphs on an input unlike the captured one, their outputs poisoned first,
        and compare with the eager step: a graph captured on the wrong device or stream is
        empty and would return stale logits forever. Writes only the block's uncommitted cache
        slots, which the next call overwrites. Returns what is wrong, or None."""
        vocab = self.model.config.vocab_size
        probe = (torch.arange(self.x.numel(), device=self.device).view_as(self.x) * 7919 + 1) % (vocab - 1)
        self.x.copy_(probe)
        want = self.model.step_static(self.x.clone(), self.cache, self.consts)
        self.out.fill_(math.nan)
        self.graph.replay()
        if not _close(self.out, want):
            return "its logits differ from the eager step's"
        pos = self.cache.start + torch.arange(self.block, device=self.device)
        keys = self.cache.k[-1]
        want = keys.index_select(2, pos).clone()  # written by the eager step above
        keys.index_fill_(2, pos, math.nan)
        self.commit_graph.replay()
        if not _close(keys.index_select(2, pos), want):
            return "its commit pass does not write the KV cache"
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        with torch.inference_mode():
            # always through the owned buffer: one input layout, so a strided x[:, s:e] recompiles nothing
            self.x[:b].copy_(x)
            if self.graph is None:
                out = self.fn(self.x, self.cache, self.consts)
            else:
                self.graph.replay()
                out = self.out
        return out if b == self.batch else out[:b]

    def commit(self, x: torch.Tensor) -> None:
        """Write the finished block's keys and values (no output layer) and advance the cache."""
        b, n = x.shape
        with torch.inference_mode():
            self.x[:b].copy_(x)
            if self.commit_graph is None:
                self.commit_fn(self.x, self.cache, self.consts)
            else:
                self.commit_graph.replay()
            self.cache.start += n
        self.cache.length += n

    def reset(self) -> None:
        """Empty the cache for a new batch (stale keys beyond `start` are masked out)."""
        self.cache.length = 0
        with torch.inference_mode():
            self.cache.start.zero_()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether a replay computed `want` (up to the rounding of compiled vs eager kernels)."""
    tol = 1e-2 if want.dtype == torch.float32 else 5e-2
    got, want = got.float(), want.float()
    err = (got - want).abs().max()
    return bool(torch.isfinite(got).all() and err <= tol * want.abs().max() + 1e-6)


def capture(fn, device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, output) of `fn()` captured on `device`, made current: three warm-up calls on a
    side stream (kernels chosen, workspaces allocated), then the capture on a private stream.
    Unlike `torch.cuda.graph`, the stream context is left and the capture ended whatever raises
    (`end_capture`): no stream stays capturing and the allocator does not stay in the capture's
    pool."""
    with torch.cuda.device(device), torch.inference_mode():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        with torch.cuda.stream(torch.cuda.Stream(device)):
            graph.capture_begin(pool=pool)
            try:
                out = fn()
            finally:
                end_capture(graph, pool, device)
    return graph, out


def end_capture(graph: Any, pool: Any, device: torch.device) -> None:
    """`graph.capture_end()`; when it raises, the allocator is taken out of the capture's pool
    and the pool released before the error goes on. (`capture_end` raises before it ends the
    pool when the capture was invalidated, e.g. by a host sync inside it; the allocator would
    then route allocations to a dead pool and `torch.cuda.empty_cache()` fails an internal
    assert.) A graph whose capture did end (its `pool()` answers) releases the pool itself."""
    try:
        graph.capture_end()
    except BaseException:
        try:
            graph.pool()
        except RuntimeError:
            index = device.index if device.index is not None else torch.cuda.current_device()
            with contextlib.suppress(RuntimeError):  # already ended when the failure came later
                torch._C._cuda_endAllocateToPool(index, pool)
            torch._C._cuda_releasePool(index, pool)
        raise
