"""Training throughput: one full optimiser step (forward, backward, AdamW) of the DiT.

    python bench/train_throughput.py --preset tiny --seq-len 128 --batch-size 8
    python bench/train_throughput.py --preset small --seq-len 1024 --batch-size 16 --device cuda --dtype bf16

Prints tokens/s (data tokens: batch x L per step), ms/step, peak memory, the useful FLOPs per
sequence and, on CUDA, MFU against --peak-tflops. Also in the same run: block --block-size vs the
global block L (the 1L pass), and on CUDA the flex back-end vs dense-mask SDPA. Figures only:
nothing here passes or fails on time.

Useful FLOPs per sequence and step (the issue's count): 6 x (transformer matmul weights) x 2L for
the [x_t ; x_0] pass (x L for the 1L pass at block L) + 6 x V x D x L for the output layer over the
L noisy tokens. About 1.28 TFLOP for `small` at L = 1024.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from did_cli import attention  # noqa: E402
from did_cli.config import DiffusionConfig, preset  # noqa: E402
from did_cli.diffusion import nelbo  # noqa: E402
from did_cli.model import DiT  # noqa: E402


def useful_flops(cfg, length: int, block: int) -> float:
    d, m = cfg.hidden_dim, cfg.mlp_ratio * cfg.hidden_dim
    per_layer = 4 * d * d + 2 * d * m  # qkv + out + mlp
    tokens = length if block >= length else 2 * length
    return 6.0 * cfg.n_blocks * per_layer * tokens + 6.0 * cfg.vocab_size * d * length


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (max allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss / 2**20:.2f} GiB (process max RSS)"


def run(model, opt, x0, block: int, steps: int, warmup: int, dtype, device) -> float:
    """Median seconds per optimiser step."""
    dcfg = DiffusionConfig()
    g = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = nelbo(model, x0, block, dcfg, model.config.mask_id, g)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="Device peak for MFU (H100 SXM dense bf16: 989).")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = preset(args.preset, model_length=args.seq_len, dropout=0.0)
    torch.manual_seed(0)
    model = DiT(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type in ("cuda", "cpu"))
    x0 = torch.randint(0, cfg.mask_id, (args.batch_size, args.seq_len), device=device)
    x0[:, 0] = cfg.bos_id
    L, B = args.seq_len, args.block_size
    tokens = args.batch_size * L
    print(f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, L={L}, "
          f"batch {args.batch_size}, {args.dtype} on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")

    results = {}
    backends = ["auto"] if device.type != "cuda" else ["flex", "sdpa"]
    for backend in backends:
        attention.set_backend(backend)
        for block in dict.fromkeys([B, L]):
            s = run(model, opt, x0, block, args.steps, args.warmup, dtype, device)
            results[(backend, block)] = s
            flops = useful_flops(cfg, L, block) * args.batch_size
            line = (f"[{backend:4s}] block {block:5d}: {tokens / s:10.0f} tokens/s  {s * 1e3:9.1f} ms/step  "
                    f"useful {useful_flops(cfg, L, block) / 1e12:.3f} TFLOP/seq")
            if device.type == "cuda":
                line += f"  MFU {flops / s / (args.peak_tflops * 1e12) * 100:5.1f}%"
            print(line)
    attention.set_backend("auto")
    print(f"peak memory: {peak_memory(device)}")
    first = backends[0]
    if B != L:
        print(f"ratio block {B} / block L ({first}): {results[(first, B)] / results[(first, L)]:.2f}x the time of the 1L pass")
    if device.type == "cuda":
        print(f"ratio flex / dense-mask SDPA at block {B}: {results[('flex', B)] / results[('sdpa', B)]:.2f}x the time")


if __name__ == "__main__":
    main()
