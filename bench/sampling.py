"""Sampling throughput: drafting (cached vs recomputed), a global refine stage, memory.

    python bench/sampling.py --preset tiny --length 128 --batch-sizes 1,8
    python bench/sampling.py --model runs/x --device cuda --dtype bf16

Two tables. The first runs the library (`did_cli.sampling.draft` / `refine`). The second is
first-hitting drafting through `did_cli.sampling.fast` (no host sync per call): the eager cached
step (`DiT.step`, the reference), the static-shape step run eagerly, and on CUDA its CUDA-graph
replay (`GraphedStep`), with float32 weights under autocast and with a bf16 weight copy. Beside
each: ms per model call, calls/s, generated tokens/s, peak memory per sample, KV-cache bytes, and
on a GPU the weight-read limit per call (bytes of the multiplied weights / HBM bandwidth,
detected from the device name; --hbm-tbps overrides).

Prints figures side by side for one run; asserts nothing about time. Random-weight presets
give the speed of the real code paths, not meaningful text.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from devinfo import peak_bytes, peaks, reset_peak  # noqa: E402

from did_cli.core.dit import DiT  # noqa: E402
from did_cli.core.model_config import PRESETS, preset  # noqa: E402
from did_cli.io.model_folder import load_model  # noqa: E402
from did_cli.io.tokenizer import load_tokenizer  # noqa: E402
from did_cli.sampling import DraftConfig, RefineConfig, draft, refine  # noqa: E402  # noqa: E402
from did_cli.sampling.fast import FastFirstHitting, weight_bytes  # noqa: E402
from did_cli.util import resolve_device  # noqa: E402


def build(args) -> DiT:
    if args.model:
        from did_cli.io.checkpoint import resolve_checkpoint

        model, _ = load_model(resolve_checkpoint(args.model), device="cpu")
    else:
        torch.manual_seed(0)
        model = DiT(preset(args.preset, dropout=0.0))
        with torch.no_grad():  # small noise so that outputs are not uniform
            for p in model.parameters():
                p.normal_(0.0, 0.02)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return out, time.perf_counter() - t, peak


def fast_draft_figures(
    model: DiT,
    length: int,
    block: int,
    batches: list[int],
    dtype: str,
    device: torch.device,
    hbm_tbps: float | None = None,
    eager_length: int | None = None,
    variants: list[str] | None = None,
    log=print,
    time_left=None,
    rows: list | None = None,
) -> list[dict]:
    """First-hitting drafting through did_cli.sampling.fast, one row per (variant, batch).

    Peak memory per sample: (peak allocated during the timed run - the model's weights) / batch,
    so it holds the KV cache, the CUDA-graph pool, activations and sampling buffers (and the
    bf16 weight copy of 'graph-bf16w').
    Variants: 'eager-step' (DiT.step, the reference), 'eager-static' (step_static, no graph),
    'graph' (CUDA graph, float32 weights under autocast), 'graph-bf16w' (CUDA graph, bf16 weight
    copy). The eager variants draft `eager_length` tokens (default: all): their cost per call
    does not depend on the position, and a full sample takes long. `time_left()`: seconds to the
    caller's deadline (rows that would start after it are skipped); `rows`: a list the rows are
    appended to as they are measured (a caller cut short keeps them)."""
    if hbm_tbps is None:
        hbm_tbps = peaks(device)[1]
    if variants is None:
        variants = ["eager-step", "eager-static"]
        if device.type == "cuda":
            variants += ["graph"] + (["graph-bf16w"] if dtype != "fp32" else [])
    wb = {v: weight_bytes(model, "bf16" if v == "graph-bf16w" else "fp32") for v in variants}
    log(
        f"{'fast first-hitting':<18}{'batch':>6}{'tokens':>7}{'tok/s':>10}{'calls/s':>9}{'ms/call':>9}"
        f"{'limit ms':>9}{'MiB/smp':>9}{'KV MiB':>8}"
    )
    rows = [] if rows is None else rows
    for v in variants:
        for b in batches:
            if time_left is not None and time_left() <= 0:
                log(f"{v:<18}{b:>6}  skipped: deadline")
                continue
            L = length if v.startswith("graph") or not eager_length else min(length, eager_length)
            L -= L % block
            reset_peak(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the model's weights
            fh = FastFirstHitting(
                model,
                b,
                L,
                block,
                dtype=dtype,
                reference=v == "eager-step",
                use_graph=v.startswith("graph"),
                compile=v.startswith("graph"),
                low_precision_weights=v == "graph-bf16w",
            )
            fh.run(torch.Generator(device=device).manual_seed(0))  # warm-up: kernels, allocator, tables
            g = torch.Generator(device=device).manual_seed(1)
            out, secs, _ = timed(lambda fh=fh, g=g: fh.run(g), device)
            pk = peak_bytes(device)
            limit = wb[v] / (hbm_tbps * 1e12) * 1e3 if hbm_tbps and device.type == "cuda" else None
            row = {
                "variant": v,
                "batch": b,
                "length": L,
                "seconds": secs,
                "calls": out.calls,
                "tokens_per_s": b * (L - 1) / secs,
                "calls_per_s": out.calls / secs,
                "ms_per_call": secs / out.calls * 1e3,
                "weight_read_ms": limit,
                "weight_bytes": wb[v],
                "peak_mib_per_sample": (pk - base) / b / 2**20 if pk is not None else None,
                "kv_cache_bytes": fh.cache.nbytes(),
                "graphed": fh.graphed,
                "compiled": bool(getattr(fh.step, "compiled", False)),
            }
            rows.append(row)
            log(
                f"{v:<18}{b:>6}{L:>7}{row['tokens_per_s']:>10.1f}{row['calls_per_s']:>9.1f}"
                f"{row['ms_per_call']:>9.3f}{_fmt(limit, 3):>9}{_fmt(row['peak_mib_per_sample'], 1):>9}"
                f"{fh.cache.nbytes() / 2**20:>8.1f}"
            )
            del fh, out
    return rows


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint or run folder")
    src.add_argument("--preset", default="tiny", choices=list(PRESETS), help="random weights of a preset")
    ap.add_argument(
        "--length", type=int, default=None, help="tokens per sample (default: the model's length)"
    )
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--n", type=int, default=None, help="samples per measurement (default: the batch size)")
    ap.add_argument("--tokens-per-step", type=int, default=2, help="K of the parallel sampler")
    ap.add_argument("--samplers", default="first-hitting,parallel")
    ap.add_argument("--ratio", type=float, default=0.25, help="re-mask ratio of the global refine stage")
    ap.add_argument("--no-uncached", action="store_true", help="skip the (slow) recomputation runs")
    ap.add_argument(
        "--hbm-tbps",
        type=float,
        default=None,
        help="GPU memory bandwidth (TB/s) for the weight-read limit (default: by device name; H100 3.35, "
        "H200 4.8)",
    )
    ap.add_argument("--no-fast", action="store_true", help="skip the did_cli.sampling.fast table")
    ap.add_argument(
        "--eager-length",
        type=int,
        default=None,
        help="tokens drafted by the eager fast-draft variants (default: all)",
    )
    args = ap.parse_args()

    device = resolve_device(args.device)
    model = build(args).to(device)
    tok = load_tokenizer(getattr(model.config, "tokenizer", "gpt2"))
    L = args.length or model.config.model_length
    batches = [int(b) for b in args.batch_sizes.split(",")]
    wbytes = weight_bytes(model, args.dtype)  # the multiplied weights (the input embedding is gathered)
    kv = model.new_cache(1, L, dtype=torch.bfloat16 if args.dtype == "bf16" else None).nbytes()
    name = args.model or f"preset {args.preset} (random weights)"
    print(
        f"# {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, L={L}, block "
        f"{args.block_size}, "
        f"{device.type}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
        f"{args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"# KV cache per sample: {kv / 2**20:.2f} MiB; multiplied weights {wbytes / 2**20:.1f} MiB")
    hbm = args.hbm_tbps or peaks(device)[1]
    limit_ms = wbytes / (hbm * 1e12) * 1e3 if device.type == "cuda" and hbm else None

    # warm-up: kernels, allocator, rotary tables
    list(
        draft(
            model,
            DraftConfig(n=1, length=2 * args.block_size, block_size=args.block_size, dtype=args.dtype),
            tokenizer=tok,
            progress=False,
        )
    )

    head = f"{'sampler':<14}{'batch':>6}{'tok/s':>10}{'calls/s':>9}{'ms/call':>9}{'NFE/smp':>9}"
    head += f"{'uncached x':>11}{'refine/draft':>13}{'peak MiB/smp':>13}"
    if limit_ms is not None:
        head += f"{'weight-read ms':>15}"
    print(head)
    for sampler in args.samplers.split(","):
        k = args.tokens_per_step if sampler == "parallel" else None
        for bs in batches:
            n = args.n or bs
            cfg = DraftConfig(
                n=n,
                length=L,
                block_size=args.block_size,
                sampler=sampler,
                tokens_per_step=k,
                batch_size=bs,
                dtype=args.dtype,
                seed=1,
            )
            recs, secs, peak = timed(
                lambda cfg=cfg: list(draft(model, cfg, tokenizer=tok, progress=False)), device
            )
            nfe = recs[0]["nfe"]
            calls = nfe * -(-n // bs)  # calls made by all batches
            gen = sum(len(r["tokens"]) - 1 for r in recs)
            ratio = "-"
            if not args.no_uncached:
                cfg_u = DraftConfig(**{**cfg.__dict__, "use_cache": False})
                _, secs_u, _ = timed(
                    lambda cfg_u=cfg_u: list(draft(model, cfg_u, tokenizer=tok, progress=False)), device
                )
                ratio = f"{secs_u / secs:.2f}"
            rcfg = RefineConfig(
                stages=[(None, args.ratio)],
                sampler=sampler,
                tokens_per_step=k,
                batch_size=bs,
                dtype=args.dtype,
            )
            _, secs_r, peak_r = timed(
                lambda recs=recs, rcfg=rcfg: list(refine(model, recs, rcfg, tokenizer=tok, progress=False)),
                device,
            )
            if peak is not None:
                mem = f"{max(peak, peak_r or 0) / bs / 2**20:.1f}"
            else:
                mem = "-"
            line = (
                f"{sampler:<14}{bs:>6}{gen / secs:>10.1f}{calls / secs:>9.1f}"
                f"{secs / calls * 1e3:>9.2f}{nfe:>9}"
                f"{ratio:>11}{secs_r / secs:>13.3f}{mem:>13}"
            )
            if limit_ms is not None:
                line += f"{limit_ms:>15.3f}"
            print(line, flush=True)
    if not args.no_fast and "first-hitting" in args.samplers.split(","):
        print()
        fast_draft_figures(
            model, L, args.block_size, batches, args.dtype, device, args.hbm_tbps, args.eager_length
        )
    if device.type == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"# CPU: peak RSS of the whole process {rss:.0f} MiB (no per-run peak on CPU)")
    print(
        "# uncached x = time without the KV cache / time with it; refine/draft = one global stage at "
        f"ratio {args.ratio} / the draft, same batch"
    )


if __name__ == "__main__":
    main()
