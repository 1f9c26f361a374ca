"""The paper's ablation in miniature, on the bundled corpus (docs/results.md holds its numbers).

    python examples/ablation.py --quickstart quickstart --out ablation [--samples 96]

Takes the mix-scale model of a `did quickstart` run (blocks 4 and L, lambda = 0.1), trains a
control with the same recipe on block 4 only for the same number of steps, then drafts with
both and scores, under one scorer:

- draft only; global refine (ratio 0.25) with snapshot / post-hoc / random confidence;
- the ratio swept over 0.1, 0.25, 0.5, 0.75 (snapshot, global);
- refine block size 16 / 64 / L at ratio 0.25 (snapshot);
- the block-4-only control: draft, and draft + global refine;
- drafts of the mix-scale model at top-p 0.8: the entropy control of the verdicts.

Writes OUT/ablation.json and OUT/ablation.md (a table with mean gen PPL, its standard error,
median, entropy, the change against the draft and the verdict of `did eval-ppl`'s rule,
did_cli/evaluation/verdict.py, read with the top-p 0.8 control for the mix-scale rows). Sizes
via options; every stage is the library call the CLI makes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quickstart", required=True, help="folder of a did quickstart run (holds data/ and run/)"
    )
    ap.add_argument("--out", default="ablation")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--scorer", default=None, help="scorer spec (default: as did eval-ppl)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ratios", default="0.1,0.25,0.5,0.75")
    ap.add_argument("--blocks", default="16,64")
    ap.add_argument("--skip-control", action="store_true", help="do not train the block-4-only control")
    ap.add_argument("--control-top-p", type=float, default=0.8, help="nucleus of the entropy-control drafts")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    args = ap.parse_args()

    import torch

    from did_cli.evaluation import gen_ppl as evaluate
    from did_cli.evaluation.scorer import load_scorer
    from did_cli.io.checkpoint import read_best, resolve_checkpoint
    from did_cli.io.model_folder import load_model
    from did_cli.io.record_writer import RecordWriter
    from did_cli.sampling import DraftConfig, RefineConfig, draft, refine
    from did_cli.training import TrainConfig, train
    from did_cli.util import resolve_device

    device = resolve_device(args.device)

    qs, out = Path(args.quickstart), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_run = json.loads((qs / "run" / "config.json").read_text())
    L = cfg_run["model"]["model_length"]
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    mix_ckpt = resolve_checkpoint(qs / "run", which="best")
    mix, _ = load_model(mix_ckpt, device=device)
    sets: dict[str, list[dict]] = {}

    def save(name: str, recs: list[dict]) -> None:
        sets[name] = recs
        with RecordWriter(out / f"{name}.jsonl") as w:
            for r in recs:
                w.write(r)

    block = int(cfg_run["block_sizes"][0])
    say(f"drafting {args.samples} samples with the mix-scale model {mix_ckpt}")
    drafts = list(
        draft(
            mix,
            DraftConfig(n=args.samples, length=L, block_size=block, batch_size=32, seed=args.seed),
            progress=False,
            model_path=str(mix_ckpt),
        )
    )
    save("mix_draft", drafts)
    say(f"drafting the entropy control: the same seeds at top-p {args.control_top_p}")
    control_cfg = DraftConfig(
        n=args.samples, length=L, block_size=block, batch_size=32, seed=args.seed, top_p=args.control_top_p
    )
    save("mix_draft_top_p_control", list(draft(mix, control_cfg, progress=False, model_path=str(mix_ckpt))))

    def refined(model, recs, stages, confidence="snapshot"):
        return list(
            refine(
                model,
                recs,
                RefineConfig(stages=stages, confidence=confidence, batch_size=32, seed=args.seed),
                progress=False,
            )
        )

    for conf in ("snapshot", "posthoc", "random"):
        say(f"global refine, ratio 0.25, {conf} confidence")
        save(f"mix_refine_L_0.25_{conf}", refined(mix, drafts, [(None, 0.25)], conf))
    for r in [float(v) for v in args.ratios.split(",")]:
        if r != 0.25:
            say(f"global refine, ratio {r}")
            save(f"mix_refine_L_{r}_snapshot", refined(mix, drafts, [(None, r)]))
    for b in [int(v) for v in args.blocks.split(",")]:
        if b < L:
            say(f"refine with block {b}, ratio 0.25")
            save(f"mix_refine_{b}_0.25_snapshot", refined(mix, drafts, [(b, 0.25)]))

    if not args.skip_control:
        best = read_best(qs / "run") or {}
        steps = int(best.get("step") or cfg_run["train"]["steps"])
        t = cfg_run["train"]
        ctrl_run = out / "control_run"
        say(f"training the block-{block}-only control for {steps} steps")
        train(
            TrainConfig(
                data=str(qs / "data"),
                out=str(ctrl_run),
                preset=t["preset"],
                block_sizes=[block],
                block_weights=[1.0],
                steps=steps,
                batch_size=t["batch_size"],
                lr=t["lr"],
                warmup=t["warmup"],
                ema=t["ema"],
                eval_every=t["eval_every"],
                eval_batches=t["eval_batches"],
                save_every=t["save_every"],
                keep_last=1,
                seed=t["seed"],
                resume=(ctrl_run / "checkpoints").is_dir(),
                progress=False,
            )
        )
        ctrl_ckpt = resolve_checkpoint(ctrl_run, which="best")
        ctrl, _ = load_model(ctrl_ckpt, device=device)
        say("drafting and refining with the control")
        cd = list(
            draft(
                ctrl,
                DraftConfig(n=args.samples, length=L, block_size=block, batch_size=32, seed=args.seed),
                progress=False,
                model_path=str(ctrl_ckpt),
            )
        )
        save("block4only_draft", cd)
        save("block4only_refine_L_0.25_snapshot", refined(ctrl, cd, [(None, 0.25)]))

    say("scoring")
    scorer = load_scorer(args.scorer, device=str(device))
    results = {name: evaluate.gen_ppl(recs, scorer) for name, recs in sets.items()}
    for res in results.values():
        ppls = [s["ppl"] for s in res["samples"] if s["ppl"] is not None]
        res["summary"]["stderr_mean_ppl"] = (
            statistics.stdev(ppls) / math.sqrt(len(ppls)) if len(ppls) > 1 else None
        )
    (out / "ablation.json").write_text(
        json.dumps(
            {
                "scorer": scorer.name,
                "samples": args.samples,
                "length": L,
                "mix_checkpoint": str(mix_ckpt),
                "torch": torch.__version__,
                "seconds": round(time.perf_counter() - t0),
                "results": {k: v["summary"] for k, v in results.items()},
            },
            indent=2,
        )
    )
    write_table(out / "ablation.md", results, scorer.name)
    say(f"done: {out / 'ablation.md'}")


def write_table(path: Path, results: dict, scorer: str) -> None:
    from did_cli.evaluation.verdict import compare_sets

    def ref_of(name: str) -> str:
        return "block4only_draft" if name.startswith("block4only") else "mix_draft"

    control = results.get("mix_draft_top_p_control")
    rows = [
        "| setting | mean gen PPL ± s.e. | median | mean entropy | gen PPL vs draft | entropy vs draft "
        "| verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        s, ref = res["summary"], results[ref_of(name)]
        r = ref["summary"]
        dp = (s["mean_ppl"] - r["mean_ppl"]) / r["mean_ppl"] * 100
        de = (s["mean_entropy"] - r["mean_entropy"]) / r["mean_entropy"] * 100
        se = s.get("stderr_mean_ppl")
        verdict = ""
        if name != ref_of(name) and name != "mix_draft_top_p_control":
            ctrl = control["samples"] if control and ref_of(name) == "mix_draft" else None
            verdict = compare_sets(ref["samples"], res["samples"], ctrl)["verdict"] or ""
        rows.append(
            f"| {name} | {s['mean_ppl']:.1f} ± {se:.1f} | {s['median_ppl']:.1f} | {s['mean_entropy']:.3f} | "
            f"{dp:+.1f}% | {de:+.1f}% | {verdict} |"
        )
    path.write_text(
        f"Scorer: {scorer}; {results['mix_draft']['summary']['n']} samples per setting.\n\n"
        + "\n".join(rows)
        + "\n"
    )


if __name__ == "__main__":
    main()
