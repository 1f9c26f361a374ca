"""Training state under a sharding wrapper: FSDP1 (auto-wrapped blocks, `use_orig_params`) and
FSDP2 (`fully_shard`), as Accelerate's FSDP plugin builds them, next to DDP or no wrapper.

Under sharding each process holds a piece of every parameter: an FSDP1 parameter is a flat view
of this process's slice (possibly empty), an FSDP2 parameter a DTensor whose local tensor is a
slice of dim 0. The helpers here never depend on the layout: they read and write the pieces
through the model itself (`local`), and go between pieces and whole tensors with
torch.distributed.checkpoint's state-dict functions, which know every wrapper.

- `full_state_dict` / `load_full_state_dict`: whole tensors out of and into a wrapped model.
- `holding`: the model's own pieces put aside while others (the EMA's) stand in for them.
- `optimizer_state` / `load_optimizer_state`: the optimizer state keyed by parameter name, one
  format for every wrapper, so a checkpoint resumes under any of them or none.
- `clip_grad_norm`: the norm of the whole gradient, not of this process's piece.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _wrapper_classes() -> tuple[type, ...]:
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2
        return (FullyShardedDataParallel,)
    return (FullyShardedDataParallel, FSDPModule)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether an FSDP wrapper (1 or 2) manages any part of `model`."""
    classes = _wrapper_classes()
    return bool(classes) and any(isinstance(m, classes) for m in model.modules())


def local(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter `p` this process holds and updates (a DTensor's local tensor; any
    other tensor, an FSDP1 flat view included, is its own part). Writable in place."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _offload(model: torch.nn.Module) -> bool:
    # gathering onto the CPU keeps the whole model off the accelerator; on a CPU device FSDP1's
    # offload frees the very storage it returns, so the tensors stay where they are
    return next(model.parameters()).device.type != "cpu"


def full_state_dict(model: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded `model` (collective: every process calls it). Without
    `everywhere`, on an accelerator only the main process gets it (on the CPU) and the others an
    empty dict; with it, every process gets whole tensors on its device."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    offload = not everywhere and _offload(model)
    return get_model_state_dict(model, options=_options(cpu_offload=offload))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set a sharded `model` from a whole state dict every process holds: each keeps its piece
    (in place: the optimizer's parameters stay the same objects)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=True))


@contextmanager
@torch.no_grad()
def holding(model: torch.nn.Module, pieces: list[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Within the block `model`'s parameters hold `pieces` (one per `local` parameter part, in
    `model.parameters()` order; None: as they are); yields the parameter parts, and restores
    the model's own values on the way out, whatever the block did to them."""
    parts = [local(p) for p in model.parameters()]
    saved = [t.detach().clone() for t in parts]
    try:
        if pieces is not None:
            for t, s in zip(parts, pieces):
                t.copy_(s)
        yield parts
    finally:
        for t, s in zip(parts, saved):
            t.copy_(s)


def local_pieces(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """This process's float32 pieces of the whole state dict `state`, laid out as `model`'s own
    parameters (collective); the model keeps its weights."""
    with holding(model) as parts:
        load_full_state_dict(model, state)
        return [t.detach().float().clone() for t in parts]


# ------------------------------------------------------------------------------ the optimizer


def _keyed_by_name(state: dict) -> bool:
    groups = state.get("param_groups", [])
    return bool(groups) and bool(groups[0]["params"]) and isinstance(groups[0]["params"][0], str)


def by_name(state: dict, names: list[str]) -> dict:
    """A torch optimizer state dict (parameters numbered in creation order) keyed by the names
    of those parameters instead, the form torch.distributed.checkpoint writes."""
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def by_index(state: dict, names: list[str]) -> dict:
    """The inverse of `by_name`."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state(model: torch.nn.Module, optimizer: Any, names: list[str]) -> dict:
    """The optimizer's whole state keyed by parameter name (`names`: the unwrapped model's, in the
    order the optimizer was built with). Collective under sharding, where the main process gets
    it (others may get an empty dict)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    if not is_sharded(model):
        return by_name(opt.state_dict(), names)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options(cpu_offload=_offload(model)))


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict, names: list[str]) -> None:
    """Restore `optimizer_state` (or a plain torch state dict of older checkpoints) into the
    optimizer of `model`, wrapped or not."""
    if not _keyed_by_name(state):
        state = by_name(state, names)
    if not is_sharded(model):
        optimizer.load_state_dict(by_index(state, names))
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    opt = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, opt, state, options=_options())


def clip_grad_norm(accel: Any, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradient of the whole model to `max_norm`; returns its norm. FSDP1 holds plain
    tensors per process, whose norms only the wrapper can combine; Accelerate's clipping covers
    the rest (DTensors of FSDP2 included), whatever wrapper it thinks it made."""
    classes = _wrapper_classes()
    if classes and isinstance(model, classes[0]):
        accel.unscale_gradients()
        return model.clip_grad_norm_(max_norm)
    return accel.clip_grad_norm_(model.parameters(), max_norm)
