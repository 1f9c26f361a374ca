"""What `did train --clip auto` costs per evaluation: the clip search scores every candidate
range (36 by default) on --clip-batches validation batches (100) with one forward pass each.

    python bench/clip_search_cost.py                       # tiny preset, L = 128, batch 16, CPU
    python bench/clip_search_cost.py --candidates 4 --batches 6 --threads 2

Measures the tiny preset's seconds per (candidate x batch) forward pass of `search_clip` on
random tokens, then scales to the other presets by forward FLOPs per batch (printed beside):
2 x (transformer matmul weights) x 2L tokens for the [x_t ; x_0] pass, attention scores and
values over the 2L x 2L block-diffusion mask (4 x 2L x 2L x D per layer, SDPA computes the
dense product), and 2 x V x D over the masked tokens (half of L on average). Figures only:
scaled rows are estimates for the same device, not measurements.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from did_cli.core.dit import DiT  # noqa: E402
from did_cli.core.model_config import PRESETS, preset  # noqa: E402
from did_cli.io.terminal import seconds_text  # noqa: E402
from did_cli.training.clip_search import clip_grid, search_clip  # noqa: E402


def forward_flops(name: str, batch: int) -> float:
    """Forward FLOPs of one clip-search batch at a preset's own length (module docstring)."""
    p = preset(name)
    d, L, V, layers = p.hidden_dim, p.model_length, p.vocab_size, p.n_layers
    matmul = 4 * d * d + 2 * d * p.mlp_ratio * d
    per_seq = layers * (2 * matmul * 2 * L + 4 * (2 * L) ** 2 * d) + 2 * V * d * (L // 2)
    return batch * per_seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16, help="rows per batch (--batch-size of did train)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=3, help="candidates timed (of the 36)")
    ap.add_argument("--batches", type=int, default=4, help="batches timed per candidate")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("tiny", dropout=0.0)
    model = DiT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.vocab_size - 1, (args.batch_size, cfg.model_length), generator=g)
        for _ in range(args.batches)
    ]
    grid = clip_grid()
    search_clip(model, batches[:1], args.block_size, cfg.mask_id, 0, grid[:1])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    search_clip(model, batches, args.block_size, cfg.mask_id, 0, grid[: args.candidates])
    n = args.candidates * args.batches
    wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    # on a machine shared with other work the wall time stretches; CPU time / threads is what an
    # idle machine would take (the threads kept busy)
    per = min(wall, cpu / torch.get_num_threads())
    full = len(grid) * 100
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"device: cpu, {torch.get_num_threads()} threads, load {load}; batch {args.batch_size}, "
        f"block {args.block_size}"
    )
    print(
        f"tiny: {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU per candidate x batch ({args.candidates} x "
        f"{args.batches} measured); {per * 1e3:.0f} ms used below"
    )
    print(f"defaults: {len(grid)} candidates x 100 batches = {full} passes per evaluation and block size")
    base = forward_flops("tiny", args.batch_size)
    print(f"{'preset':8} {'L':>5} {'GFLOP/batch':>12} {'x tiny':>8} {'per evaluation':>16}")
    for name in PRESETS:
        f = forward_flops(name, args.batch_size)
        est = per * f / base * full
        kind = "measured" if name == "tiny" else "scaled"
        print(
            f"{name:8} {PRESETS[name]['model_length']:>5} {f / 1e9:>12.1f} {f / base:>8.1f} "
            f"{seconds_text(est):>16} ({kind})"
        )


if __name__ == "__main__":
    main()
