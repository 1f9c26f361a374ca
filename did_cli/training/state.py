"""Training state that must resume exactly: the block-size sampler, which rows each step
reads, the EMA weights, the RNG states, and `TrainState`, the bookkeeping saved and restored as
one object. Every piece is a function of the seed and the step or is saved in checkpoints, so an
interrupted run continues bit for bit."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from did_cli.core.backbones import build_backbone
from did_cli.errors import DidError
from did_cli.util import save_json


@dataclass
class TrainState:
    """A run's bookkeeping at a checkpoint (`train_state/state.json`); the tensors beside it
    (raw weights, optimizer, scheduler, RNG) are saved by the trainer."""

    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """Epoch of the row order the next step reads from."""
    position: int = 0
    """Rows of that epoch already read."""
    rows_per_step: int = 0
    """Global batch: batch x accumulation x processes."""
    world_size: int = 1
    seed: int = 0
    data_hash: str | None = None
    """content_hash of the prepared data (a fine-tune on the same rows reads on from here)."""
    ema_updates: int = 0
    block_sampler: dict | None = None
    """The block-size sampler's generator state."""
    block_sizes: list[int] = field(default_factory=list)
    block_weights: list[float] = field(default_factory=list)
    clip_ranges: dict[str, list[float]] = field(default_factory=dict)
    """t range per block size (keys are block sizes as text, as in JSON)."""
    clip_mode: str = "init"
    """'auto' (searched at each evaluation), 'fixed' (--clip) or 'init' (default or from --init)."""
    best: dict | None = None
    """Step and validation NELBO of the best checkpoint so far."""
    init_info: dict = field(default_factory=dict)
    """Where the starting weights came from (--init) and where its data order stopped."""

    def save(self, path: Path) -> None:
        save_json(dataclasses.asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        try:
            raw = json.loads(Path(path).read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in names})
        except (OSError, ValueError, TypeError) as e:
            raise DidError(f"{path}: cannot read training state ({e})") from None

    def clip_ranges_by_size(self) -> dict[int, tuple[float, float]]:
        return {int(k): (float(v[0]), float(v[1])) for k, v in self.clip_ranges.items()}


# ------------------------------------------------------------------------------------ samplers


class BlockSizeSampler:
    """Draws one block size per optimisation step with probabilities `weights`.

    Every process builds it from the same seed and draws once per step, so all ranks agree; its
    generator state is saved in checkpoints for an exact resume."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes = list(sizes)
        self.cum = np.cumsum(np.asarray(weights, dtype=np.float64))
        self.cum[-1] = 1.0
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x6B5])))

    def draw(self) -> int:
        u = self.rng.random()
        return self.sizes[int(np.searchsorted(self.cum, u, side="right"))]

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def step_seed(seed: int, step: int, process: int, micro: int, purpose: int) -> int:
    """A 63-bit seed that depends only on its arguments (SeedSequence mixes them well)."""
    s = np.random.SeedSequence([seed, step, process, micro, purpose]).generate_state(2, dtype=np.uint32)
    return int(s[0]) << 31 ^ int(s[1])


class RowSchedule:
    """Which training rows each (step, micro-batch, process) reads: a pure function of the seed.

    Each epoch is a seeded permutation of all rows; a step consumes `rows_per_step` of them
    (batch x grad_accum x processes; a remainder too small for a step is skipped). Within one
    micro-batch process p takes the p-th slice, so the rows of a global batch do not depend on
    how many processes share it."""

    def __init__(self, n_rows: int, batch: int, accum: int, world: int, seed: int):
        self.n, self.batch, self.accum, self.world, self.seed = n_rows, batch, accum, world, seed
        self.rows_per_step = batch * accum * world
        if n_rows < self.rows_per_step:
            raise DidError(
                f"the training split has {n_rows} rows, fewer than one step needs "
                f"({batch} x {accum} accumulation x {world} processes); use a smaller --batch-size"
            )
        self.steps_per_epoch = n_rows // self.rows_per_step
        self._perm: tuple[int, np.ndarray] | None = None
        self._first = 0  # step 0 reads the stream from this step slot on

    def start_at(self, epoch: int, position: int) -> None:
        """Begin where another run (same rows, same seed) stopped: at `epoch`, after `position`
        rows of it, rounded up to a whole step (so a fine-tune reads no row twice before the
        epoch ends, whatever its batch size)."""
        self._first = epoch * self.steps_per_epoch + -(-position // self.rows_per_step)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, rows consumed within it) before optimisation step `step` (0-based)."""
        k = self._first + step
        return k // self.steps_per_epoch, (k % self.steps_per_epoch) * self.rows_per_step

    def perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0xDA7A, epoch])))
            self._perm = (epoch, rng.permutation(self.n))
        return self._perm[1]

    def indices(self, step: int, micro: int, process: int) -> np.ndarray:
        epoch, pos = self.position(step)
        start = pos + (micro * self.world + process) * self.batch
        return np.sort(self.perm(epoch)[start : start + self.batch])


# ----------------------------------------------------------------------------------------- EMA


class EMA:
    """Float32 exponential moving average of the weights, held in its own model of the same
    family (on the device)."""

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device):
        self.decay = decay
        self.num_updates = 0
        self.model = build_backbone(model.config).to(device=device, dtype=torch.float32)
        self.model.load_state_dict(model.state_dict())
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        n = self.num_updates
        d = min(self.decay, (1 + n) / (10 + n))
        ema = list(self.model.parameters())
        src = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema, src, 1.0 - d)


# --------------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors / plain containers (weights_only-loadable)."""
    py = random.getstate()
    npst = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(npst[1].astype(np.int64)),
            "pos": int(npst[2]),
            "has_gauss": int(npst[3]),
            "cached_gaussian": float(npst[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    n = st["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])
