"""Does global refinement make an infilled middle agree with its suffix better than the draft?

    python bench/infill_agreement.py --work /tmp/did_infill            # train (once), then measure
    python bench/infill_agreement.py --work /tmp/did_infill --samples 200 --steps 1000

Train step (skipped when WORK/run has a checkpoint): the first ~2M characters of the bundled
corpus are prepared at L = 64 and a `quick`-preset model is trained on block sizes {4, L}.
Measure step: for validation rows, the first P tokens are the prompt and the last S tokens the
suffix; the middle is drafted with block size 4 (it sees the suffix only in the block that holds
it), then refined by one global stage (the middle sees both ends). Settings compared on the same
drafts: the draft, global refine with snapshot / random confidence, a block-4 refine stage (no
look-ahead: a control for "re-sampling alone"), and the real middle from the data.

Figures (lower = the middle agrees better with the suffix):
- model suffix NLL: mask the suffix only and read -log p(true suffix token) from one global
  (bidirectional) pass of the same model, mean over suffix tokens;
- scorer suffix NLL: an independent causal LM's NLL of the suffix text given the text before
  it, NLL(prompt+middle+suffix) - NLL(prompt+middle), per suffix token (scorer tokens);
- gen PPL and entropy of the whole text under the scorer.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from did_cli.io.sources import BUNDLED_CORPUS


def prepare_and_train(work: Path, steps: int, chars: int) -> Path:
    from did_cli.io.checkpoint import latest_checkpoint
    from did_cli.io.packing import prepare
    from did_cli.training import TrainConfig, train

    run = work / "run"
    if run.is_dir() and latest_checkpoint(run, warn=False) is not None:
        return run
    work.mkdir(parents=True, exist_ok=True)
    src = work / "slice.jsonl"
    if not src.exists():
        out, n = [], 0
        with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as fh:
            for line in fh:
                out.append(line)
                n += len(json.loads(line)["text"])
                if n >= chars:
                    break
        src.write_text("".join(out), encoding="utf-8")
    prepare([str(src)], work / "data", seq_len=64, val_fraction=0.05, progress=False)
    t0 = time.time()
    train(
        TrainConfig(
            data=str(work / "data"),
            out=str(run),
            preset="quick",
            block_sizes=[4, "L"],
            block_weights=[0.5, 0.5],
            steps=steps,
            batch_size=16,
            lr=1e-3,
            warmup=50,
            ema=0.99,
            eval_every=100,
            eval_batches=4,
            save_every=100,
            keep_last=1,
            log_every=50,
            progress=True,
        )
    )
    print(f"trained {steps} steps in {time.time() - t0:.0f} s", file=sys.stderr)
    return run


def val_rows(work: Path, count: int, eos: int) -> list[list[int]]:
    from did_cli.io.data import PreparedData

    rows = PreparedData(str(work / "data")).rows("validation")
    out = []
    for r in range(len(rows)):
        row = [int(t) for t in rows[r]]
        if eos not in row[1:]:  # one document per row, so the suffix belongs to the prompt's text
            out.append(row)
        if len(out) == count:
            break
    return out


@torch.no_grad()
def model_suffix_nll(model, recs: list[dict]) -> list[float]:
    """Mean -log p(suffix token) per record: suffix masked, one global pass, everything else seen."""
    mc = model.config
    out = []
    for r in recs:
        x = torch.tensor([r["tokens"]])
        hi = len(r["tokens"]) - r["suffix_len"]
        target = x[0, hi:].clone()
        x[0, hi:] = mc.mask_id
        lg = model(x)[0, hi:].double()
        lg[:, mc.mask_id] = -math.inf
        out.append(float(-(lg.log_softmax(-1).gather(1, target[:, None])).mean()))
    return out


def scorer_suffix_nll(scorer, tok, recs: list[dict]) -> list[float]:
    """Scorer NLL of the suffix text given the text before it, per suffix scorer token."""
    full = [tok.decode(r["tokens"][1:]) for r in recs]
    head = [tok.decode(r["tokens"][1 : len(r["tokens"]) - r["suffix_len"]]) for r in recs]
    a, b = scorer.nll(full, batch_size=16), scorer.nll(head, batch_size=16)
    return [(na - nb) / max(1, ka - kb) for (na, ka), (nb, kb) in zip(a, b)]


def mean_se(v: list[float]) -> str:
    m = statistics.fmean(v)
    se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{m:.3f} ± {se:.3f}"


def measure(
    run: Path,
    work: Path,
    samples: int,
    prompt_tokens: int,
    suffix_tokens: int,
    block: int,
    seed: int,
    scorer_spec: str | None,
    batch: int = 24,
) -> None:
    from did_cli import api
    from did_cli.evaluation.gen_ppl import gen_ppl
    from did_cli.evaluation.scorer import load_scorer
    from did_cli.io.records import make_record

    model, tok = api.load_model(run / "best" if (run / "best.json").exists() else run, device="cpu")
    L = model.config.model_length
    rows = val_rows(work, samples, tok.eos_id)
    print(
        f"model {model.checkpoint_path}; {len(rows)} validation rows, L = {L}, prompt {prompt_tokens} "
        "tokens, "
        f"suffix {suffix_tokens} tokens, draft block {block}",
        file=sys.stderr,
    )
    t0 = time.time()
    # one sample per row with its own prompt and suffix: the batch routine takes a prompt per
    # row (the public API shares one suffix across prompts)
    from did_cli.sampling import DraftConfig
    from did_cli.sampling.core import make_generator, mix_seed
    from did_cli.sampling.drafting_batch import draft_batch
    from did_cli.sampling.prompts import Prompt

    cfg = DraftConfig(n=1, length=L, block_size=block, seed=seed)
    sp = cfg.settings(model.config.mask_id)
    drafts = []
    for s0 in range(0, len(rows), batch):
        part = rows[s0 : s0 + batch]
        prs = [
            Prompt(f"row{s0 + k}", r[1 : 1 + prompt_tokens], r[L - suffix_tokens :])
            for k, r in enumerate(part)
        ]
        gens = [make_generator(mix_seed(seed, p.id), "cpu") for p in prs]
        for p, res in zip(prs, draft_batch(model, cfg, sp, L, prs, gens, torch.device("cpu"))):
            drafts.append(
                make_record(
                    res.tokens,
                    res.confidence,
                    id=p.id,
                    tokenizer=tok,
                    prompt_len=1 + prompt_tokens,
                    suffix_len=suffix_tokens,
                    nfe=res.nfe,
                )
            )
    print(f"drafted {len(drafts)} in {time.time() - t0:.0f} s", file=sys.stderr)
    real = [
        make_record(
            row, None, id=f"row{k}", tokenizer=tok, prompt_len=1 + prompt_tokens, suffix_len=suffix_tokens
        )
        for k, row in enumerate(rows)
    ]
    settings = {
        "draft (block 4)": drafts,
        "refine L:0.25 snapshot": api.refine(
            model, drafts, stages=[(None, 0.25)], tokenizer=tok, seed=seed, batch_size=batch
        ),
        "refine L:0.5 snapshot": api.refine(
            model, drafts, stages=[(None, 0.5)], tokenizer=tok, seed=seed, batch_size=batch
        ),
        "refine L:0.25 random": api.refine(
            model,
            drafts,
            stages=[(None, 0.25)],
            confidence="random",
            tokenizer=tok,
            seed=seed,
            batch_size=batch,
        ),
        f"refine {block}:0.25 snapshot (no look-ahead)": api.refine(
            model, drafts, stages=[(block, 0.25)], tokenizer=tok, seed=seed, batch_size=batch
        ),
        "real middle (data)": real,
    }
    scorer = load_scorer(scorer_spec, device="cpu")
    base_m = base_s = None
    print(
        f"\n{len(rows)} samples; scorer {scorer.name}; ± = standard error; Δ = paired difference vs the "
        "draft\n"
    )
    print("| setting | model suffix NLL | Δ | scorer suffix NLL | Δ | gen PPL (whole text) | entropy |")
    print("|---|---|---|---|---|---|---|")
    for name, recs in settings.items():
        m = model_suffix_nll(model, recs)
        sc = scorer_suffix_nll(scorer, tok, recs)
        g = gen_ppl(recs, scorer, batch_size=16)["summary"]
        if base_m is None:
            base_m, base_s = m, sc
        dm = mean_se([a - b for a, b in zip(m, base_m)]) if m is not base_m else "-"
        ds = mean_se([a - b for a, b in zip(sc, base_s)]) if sc is not base_s else "-"
        print(
            f"| {name} | {mean_se(m)} | {dm} | {mean_se(sc)} | {ds} | {g['mean_ppl']:.1f} | "
            f"{g['mean_entropy']:.3f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/did_infill")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--chars", type=int, default=2_000_000)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--suffix-tokens", type=int, default=14)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--scorer", default=None, help="as `did eval-ppl --scorer` (default: the offline default)"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = prepare_and_train(Path(args.work), args.steps, args.chars)
    if args.train_only:
        return
    measure(
        run,
        Path(args.work),
        args.samples,
        args.prompt_tokens,
        args.suffix_tokens,
        args.block,
        args.seed,
        args.scorer,
    )


if __name__ == "__main__":
    main()
