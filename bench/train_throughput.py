"""Training throughput: one full optimiser step (forward, backward, clip, AdamW) of the DiT.

    python bench/train_throughput.py --preset tiny --seq-len 128 --batch-size 8
    python bench/train_throughput.py --preset small --seq-len 1024 --batch-size 16 --device cuda --dtype bf16

In ONE run, side by side: block --block-size (the 2L `[x_t ; x_0]` pass) vs the global block L
(the 1L pass); on CUDA the flex back-end vs dense-mask SDPA; eager vs torch.compile'd blocks
(--compile, default on CUDA only: inductor on a CPU compiles for minutes); steps that alternate
block sizes after warm-up (B and L: two shapes; B and 16: one shape, two masks) vs the fixed
sizes, with the dynamo graph count and mask-cache misses during the alternation (both should
not move); and `did train`'s own step (`Trainer.train_step`: loss, backward, clip, fused AdamW,
EMA) on prepared data, compiled as `did train` compiles by default. Prints tokens/s (data
tokens: batch x L per step), ms/step, peak memory and MFU against the device's dense bf16 peak
(detected by name; --peak-tflops overrides). Figures only: nothing passes or fails on time.

Useful FLOPs per sequence and step (the issue's count): 6 x (transformer matmul weights) x 2L for
the [x_t ; x_0] pass (x L for the 1L pass at block L) + 6 x V x D x L for the output layer over the
L noisy tokens. About 1.28 TFLOP for `small` at L = 1024.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devinfo import device_name, peak_bytes, peaks, process_max_rss_bytes, reset_peak, sync  # noqa: E402

from did_cli.core import attention  # noqa: E402
from did_cli.core.diffusion import nelbo  # noqa: E402
from did_cli.core.dit import DiT  # noqa: E402
from did_cli.core.model_config import DiffusionConfig, preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def useful_flops(cfg, length: int, block: int) -> float:
    d, m = cfg.hidden_dim, cfg.mlp_ratio * cfg.hidden_dim
    per_layer = 4 * d * d + 2 * d * m  # qkv + out + mlp
    tokens = length if block >= length else 2 * length
    return 6.0 * cfg.n_layers * per_layer * tokens + 6.0 * cfg.vocab_size * d * length


def make_optimizer(model) -> torch.optim.Optimizer:
    try:  # fused: one kernel over all tensors (CUDA and CPU in torch >= 2.4)
        return torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=3e-4)


def time_steps(model, opt, x0, blocks: list[int], steps: int, warmup: int, dtype, device) -> float:
    """Median seconds per optimiser step; step i uses blocks[i % len(blocks)] (warm-up covers all)."""
    dcfg = DiffusionConfig()
    g = torch.Generator(device=device).manual_seed(0)
    times = []
    warmup = max(warmup, len(blocks))
    for i in range(warmup + steps):
        block = blocks[i % len(blocks)]
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = nelbo(model, x0, block, dcfg, model.config.mask_id, g)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) if times else float("nan")


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _mask_misses() -> int:
    return attention.flex_mask.cache_info().misses + attention.dense_mask.cache_info().misses


def train_figures(
    preset_name: str = "tiny",
    seq_len: int = 128,
    batch: int = 8,
    block: int = 4,
    steps: int = 10,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    peak_tflops: float | None = None,
    compile: bool | None = None,
    backends: list[str] | None = None,
    log=print,
    time_left=None,
    rows: list | None = None,
) -> dict:
    """Run every training measurement; returns {"rows": [...], "ratios": {...}, ...} and logs lines.
    `time_left()`: seconds before the caller's deadline; rows that would start after it are
    skipped (and listed under "skipped"); `rows`: a list the rows are appended to as measured."""
    device = torch.device(device)
    amp = DTYPES[dtype]
    if compile is None:
        compile = device.type == "cuda"
    if peak_tflops is None:
        peak_tflops = peaks(device)[0]
    cfg = preset(preset_name, model_length=seq_len, dropout=0.0)
    torch.manual_seed(0)
    model = DiT(cfg).to(device).train()
    opt = make_optimizer(model)
    x0 = torch.randint(0, cfg.mask_id, (batch, seq_len), device=device)
    x0[:, 0] = cfg.bos_id
    L, B = seq_len, min(block, seq_len)
    tokens = batch * L
    params = sum(p.numel() for p in model.parameters())
    info = {
        "preset": preset_name,
        "params": params,
        "seq_len": L,
        "batch": batch,
        "block": B,
        "dtype": dtype,
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_tflops": peak_tflops,
        "useful_tflop_per_seq": {
            str(B): useful_flops(cfg, L, B) / 1e12,
            str(L): useful_flops(cfg, L, L) / 1e12,
        },
    }
    log(
        f"preset {preset_name}: {params / 1e6:.1f}M params, L={L}, batch {batch}, {dtype} on "
        f"{info['device']} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads); useful "
        f"{info['useful_tflop_per_seq'][str(B)]:.3f} "
        f"TFLOP/seq at block {B}, {info['useful_tflop_per_seq'][str(L)]:.3f} at block L"
    )
    rows = [] if rows is None else rows

    def record(
        name: str, backend: str, blocks: list[int], compiled: bool, s: float, extra: dict | None = None
    ) -> dict:
        flops = statistics.fmean(useful_flops(cfg, L, b) for b in blocks) * batch
        pk = peak_bytes(device)
        row = {
            "name": name,
            "backend": backend,
            "blocks": blocks,
            "compiled": compiled,
            "ms_per_step": s * 1e3,
            "tokens_per_s": tokens / s,
            "mfu": flops / s / (peak_tflops * 1e12) if peak_tflops else None,
            "peak_gib": pk / 2**30 if pk is not None else None,
            **(extra or {}),
        }
        rows.append(row)
        line = f"{name:<28} {tokens / s:10.0f} tokens/s {s * 1e3:9.1f} ms/step"
        if row["mfu"] is not None:
            line += f"  MFU {row['mfu'] * 100:5.1f}%"
        if row["peak_gib"] is not None:
            line += f"  peak {row['peak_gib']:.2f} GiB"
        for k, v in (extra or {}).items():
            line += f"  {k} {v}"
        log(line)
        return row

    skipped: list[str] = []

    def measure(m, o, name, backend, blocks, compiled):
        if time_left is not None and time_left() <= 0:
            skipped.append(name)
            log(f"{name:<28} skipped: deadline")
            return None
        attention.set_backend(backend)
        try:
            reset_peak(device)
            if len(blocks) > 1:
                # warm every size first, then count graphs and mask builds over the timed alternation
                time_steps(m, o, x0, blocks, 0, len(blocks), amp, device)
                g0, m0 = _graph_count(), _mask_misses()
                s = time_steps(m, o, x0, blocks, steps, 0, amp, device)
                return record(
                    name,
                    backend,
                    blocks,
                    compiled,
                    s,
                    {"new_graphs": _graph_count() - g0, "mask_builds": _mask_misses() - m0},
                )
            return record(
                name, backend, blocks, compiled, time_steps(m, o, x0, blocks, steps, warmup, amp, device)
            )
        finally:
            attention.set_backend("auto")

    backends = backends or (["flex", "sdpa"] if device.type == "cuda" else ["auto"])
    first = backends[0]
    mid = 16 if B < 16 < L and L % 16 == 0 else None  # a second masked size: same shape, another mask
    res: dict = {}

    def rows_of(m, o, compiled: bool) -> None:
        tag = f"{first}+compile" if compiled else first
        # compiled first: the row the targets are about, then what a cut-off may lose
        if compiled:  # the eager fixed-B rows are measured per back-end below
            res[(first, B, compiled)] = measure(m, o, f"[{tag}] block {B}", first, [B], compiled)
        if B != L:
            res[(first, L, compiled)] = measure(m, o, f"[{tag}] block L (1L pass)", first, [L], compiled)
            res[(first, "alt", compiled)] = measure(m, o, f"[{tag}] alternate {B}/L", first, [B, L], compiled)
        if mid:
            res[(first, "mid", compiled)] = measure(
                m, o, f"[{tag}] alternate {B}/{mid}", first, [B, mid], compiled
            )

    if compile:
        t0 = time.perf_counter()
        cmodel = copy.deepcopy(model).compile_blocks()
        copt = make_optimizer(cmodel)
        g_before = _graph_count()
        rows_of(cmodel, copt, True)
        info["compile_graphs"] = _graph_count() - g_before
        info["compile_wall_s"] = time.perf_counter() - t0
        del cmodel, copt
    for backend in backends:
        res[(backend, B, False)] = measure(model, opt, f"[{backend}] block {B}", backend, [B], False)
    rows_of(model, opt, False)
    res = {k: v for k, v in res.items() if v is not None}
    info["skipped"] = skipped

    ratios = {}

    def ratio(key: str, a, b, what: str) -> None:
        if a in res and b in res:
            r = res[a]["ms_per_step"] / res[b]["ms_per_step"]
            ratios[key] = r
            log(f"ratio {what}: {r:.2f}x the time")

    ratio("block_B_over_L", (first, B, False), (first, L, False), f"block {B} / block L ({first}, eager)")
    if "sdpa" in backends and "flex" in backends:
        ratio(
            "flex_over_sdpa", ("flex", B, False), ("sdpa", B, False), f"flex / dense-mask SDPA at block {B}"
        )
    ratio("compiled_over_eager", (first, B, True), (first, B, False), f"compiled / eager at block {B}")
    ratio("compiled_over_eager_L", (first, L, True), (first, L, False), "compiled / eager at block L")
    # alternation costs nothing extra when a step at B/L alternately takes the mean of the two
    for c in (False, True):
        if (first, "alt", c) in res and (first, B, c) in res and (first, L, c) in res:
            mean = (res[(first, B, c)]["ms_per_step"] + res[(first, L, c)]["ms_per_step"]) / 2
            r = res[(first, "alt", c)]["ms_per_step"] / mean
            ratios[f"alternate_over_fixed{'_compiled' if c else ''}"] = r
            log(
                f"ratio alternating {B}/L / mean of fixed {B} and L ({'compiled' if c else 'eager'}): "
                f"{r:.2f}x"
            )
    for c in (False, True):
        if (first, "mid", c) in res and (first, B, c) in res:
            r = res[(first, "mid", c)]["ms_per_step"] / res[(first, B, c)]["ms_per_step"]
            ratios[f"alternate_mid_over_fixed_B{'_compiled' if c else ''}"] = r
            log(f"ratio alternating {B}/{mid} / fixed {B} ({'compiled' if c else 'eager'}): {r:.2f}x")
    if device.type == "cpu":
        info["process_max_rss_gib"] = process_max_rss_bytes() / 2**30
        log(f"peak memory: {info['process_max_rss_gib']:.2f} GiB (process max RSS; no per-run peak on CPU)")
    return {"info": info, "rows": rows, "ratios": ratios}


def bench_data(folder: Path, seq_len: int, rows: int) -> Path:
    """A prepared-data folder (`did prepare`) of about `rows` training rows of the bundled corpus."""
    import json
    import lzma

    from did_cli.io.packing import prepare
    from did_cli.io.sources import BUNDLED_CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    docs, chars = [], 0
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:  # ~4 characters per token; twice that, as rows pack whole documents
            docs.append(line)
            chars += len(json.loads(line).get("text", ""))
            if chars > 8 * seq_len * rows:
                break
    (folder / "slice.jsonl").write_text("".join(docs))
    prepare([str(folder / "slice.jsonl")], folder / "data", seq_len=seq_len, val_docs=2, progress=False)
    return folder / "data"


def trainer_figures(
    data: Path,
    out: Path,
    preset_name: str,
    batch: int,
    blocks: list,
    weights: list[float],
    steps: int,
    device: torch.device,
    compile: bool | None = None,
    log=print,
    time_left=None,
) -> dict:
    """`did train`'s own step, `Trainer.train_step` (the loss, backward, gradient clip, fused
    AdamW and EMA update of a real run, under its accelerator's mixed precision), on prepared
    data: warm-up until every block size ran once (compiles), then `steps` timed steps with the
    run's seeded block-size sampler. Reports tokens/s, ms/step per block size, and the dynamo
    graphs built during the timed steps (0 expected)."""
    from did_cli.training import TrainConfig
    from did_cli.training.console import Interrupt
    from did_cli.training.trainer import Trainer

    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        preset=preset_name,
        block_sizes=blocks,
        block_weights=weights,
        steps=10**6,
        batch_size=batch,
        warmup=10,
        eval_every=0,
        save_every=0,
        progress=False,
        compile=compile,
    )
    t0 = time.perf_counter()
    tr = Trainer(cfg).setup()
    intr, seen, step = Interrupt(), set(), 0
    while seen != set(tr.sizes) and step < 50:
        seen.add(tr.train_step(step, None, intr, t0).block)
        step += 1
    sync(device)
    warm_s, g0 = time.perf_counter() - t0, _graph_count()
    per: dict[int, list[float]] = {}
    t_all = time.perf_counter()
    for i in range(steps):
        if time_left is not None and time_left() <= 0:
            break
        t = time.perf_counter()
        res = tr.train_step(step + i, None, intr, t0)
        sync(device)
        per.setdefault(res.block, []).append(time.perf_counter() - t)
    n = sum(len(v) for v in per.values())
    total = time.perf_counter() - t_all
    row = {
        "name": "did train step (Trainer.train_step)",
        "compiled": tr.compiled,
        "blocks": tr.sizes,
        "steps": n,
        "warmup_steps": step,
        "warmup_s": warm_s,
        "tokens_per_s": n * batch * tr.length / total if n else None,
        "ms_per_step": total / n * 1e3 if n else None,
        "new_graphs": _graph_count() - g0,
        "peak_gib": None,
        "ms_per_step_by_block": {str(b): statistics.median(v) * 1e3 for b, v in per.items()},
    }
    pk = peak_bytes(device)
    row["peak_gib"] = pk / 2**30 if pk is not None else None
    if n:
        log(
            f"{row['name']:<28} {row['tokens_per_s']:10.0f} tokens/s {row['ms_per_step']:9.1f} ms/step  "
            f"compiled {tr.compiled}"
            f"  new graphs {row['new_graphs']}  by block {row['ms_per_step_by_block']}"
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=list(DTYPES))
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Device dense bf16 peak for MFU (default: by device name; H100 SXM / H200: 989).",
    )
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on CUDA only")
    ap.add_argument("--backends", default=None, help="comma-separated: flex,sdpa (default: both on CUDA)")
    args = ap.parse_args()
    train_figures(
        args.preset,
        args.seq_len,
        args.batch_size,
        args.block_size,
        args.steps,
        args.warmup,
        args.device,
        args.dtype,
        args.peak_tflops,
        {"auto": None, "on": True, "off": False}[args.compile],
        args.backends.split(",") if args.backends else None,
    )


if __name__ == "__main__":
    main()
