"""What sampling one row costs against computing its logits, and refine with the two samplers.

    python bench/sampler_cost.py --model runs/x                      # a trained checkpoint
    python bench/sampler_cost.py --preset tiny --init bd3lm          # untrained: BD3-LM's init
    python bench/sampler_cost.py --preset small --length 1024 --n 4 --batch-size 4 --ratio 0.25

Two tables, measured side by side in one process:

1. Per row, for the masked rows of a global refine call: the output layer (`model.logits` on
   hidden states, the chunks `core.draw` uses), the sampler as `did refine` runs it on this
   device (`nucleus.sample_rows`; on a CPU the histogram nucleus and a few tokens' noise), and
   the definition on whole rows (full sort, every token's noise). Microseconds per row and the
   ratio to the output layer.
2. `did_cli.sampling.refine` on the same drafts with one global stage: first-hitting against
   the parallel sampler (K tokens per call), wall seconds, model calls and their ratio.

Drafts come from --drafts (a JSONL file of `did draft`), are random (--random-drafts), or are
drafted here first. `--init
bd3lm` keeps BD3-LM's zero-initialised output layer (every logit equal, the untrained model);
`--init random` draws every weight from N(0, 0.02) (near-uniform, all logits distinct).
Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from did_cli.core.dit import DiT  # noqa: E402
from did_cli.core.model_config import PRESETS, preset  # noqa: E402
from did_cli.io.checkpoint import resolve_checkpoint  # noqa: E402
from did_cli.io.model_folder import load_model  # noqa: E402
from did_cli.io.records import make_record  # noqa: E402
from did_cli.io.tokenizer import load_tokenizer  # noqa: E402
from did_cli.sampling import DraftConfig, RefineConfig, core, draft, refine  # noqa: E402
from did_cli.sampling.nucleus import sample_rows  # noqa: E402
from did_cli.sampling.race import draw_noise  # noqa: E402


def build(args) -> DiT:
    if args.model:
        model, _ = load_model(resolve_checkpoint(args.model), device="cpu")
        return model.eval()
    torch.manual_seed(0)
    model = DiT(preset(args.preset, dropout=0.0, model_length=args.length or None))
    if args.init == "random":
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
    return model.eval()


def get_drafts(model, tok, args) -> list[dict]:
    if args.drafts:
        with open(args.drafts) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        return recs[: args.n]
    if args.random_drafts:  # refine's time does not depend on what the text says
        g = torch.Generator().manual_seed(1)
        mc = model.config
        return [
            make_record(
                [mc.bos_id] + torch.randint(0, mc.mask_id, (args.length - 1,), generator=g).tolist(),
                [None] + torch.rand(args.length - 1, generator=g).tolist(),
                id=f"r{i}",
                tokenizer=tok,
            )
            for i in range(args.n)
        ]
    cfg = DraftConfig(n=args.n, length=args.length, batch_size=args.batch_size, seed=1, block_size=4)
    t = time.perf_counter()
    recs = list(draft(model, cfg, tokenizer=tok, progress=False))
    print(f"drafted {len(recs)} x {len(recs[0]['tokens'])} tokens in {time.perf_counter() - t:.1f} s")
    return recs


def row_costs(model, recs: list[dict], args) -> None:
    """Per-row figures on the hidden states of a global call that re-masks every other token."""
    mc = model.config
    x = torch.tensor([r["tokens"] for r in recs[: args.batch_size]])
    x[:, 1::2] = mc.mask_id
    with torch.inference_mode():
        h = model.hidden(x)[:, 1::2].reshape(-1, mc.hidden_dim)[: args.rows]
        n = len(h)
        per = max(1, core.CHUNK_BYTES["cpu"] // (8 * mc.vocab_size))
        step = core.CPU_SAMPLE_ROWS  # as `core.draw` runs them on a CPU
        noise = draw_noise(torch.Generator().manual_seed(0), n, "cpu")
        chunks = [(lo, min(n, lo + per)) for lo in range(0, n, per)]
        logits = [model.logits(h[a:b]) for a, b in chunks]
        res = {"output layer": 1e9, "sampler": 1e9, "definition": 1e9}
        for rep in range(args.repeats):
            for name in res:
                if name == "definition" and rep:
                    continue  # the slow reference: once
                t = time.perf_counter()
                for (a, b), lg in zip(chunks, logits):
                    if name == "output layer":
                        model.logits(h[a:b])
                        continue
                    for s in range(0, b - a, step):
                        e = min(b - a, s + step)
                        sample_rows(
                            lg[s:e], noise[a + s : a + e], mc.mask_id, args.top_p, pruned=name == "sampler"
                        )
                res[name] = min(res[name], time.perf_counter() - t)
    base = res["output layer"]
    print(
        f"\nper row ({n} rows of [{mc.vocab_size}] logits; output layer on {per} rows at a time, "
        f"top-p {args.top_p})"
    )
    for name, secs in res.items():
        print(f"  {name:<14}{secs / n * 1e6:>10.1f} us/row {secs / base:>8.2f} x output layer")


def refine_times(model, tok, recs: list[dict], args) -> None:
    print(f"\nrefine: {len(recs)} drafts, one global stage at ratio {args.ratio}, batch {args.batch_size}")
    out = {}
    for sampler, k in (("first-hitting", None), ("parallel", args.tokens_per_step)):
        cfg = RefineConfig(
            stages=[(None, args.ratio)],
            sampler=sampler,
            tokens_per_step=k,
            batch_size=args.batch_size,
            top_p=args.top_p,
        )
        t = time.perf_counter()
        res = list(refine(model, recs, cfg, tokenizer=tok, progress=False))
        out[sampler] = time.perf_counter() - t
        name = sampler if k is None else f"parallel K={k}"
        print(f"  {name:<18}{out[sampler]:>9.2f} s  {res[0]['stages'][-1]['nfe']:>5} calls per batch")
    print(f"  parallel / first-hitting: {out['parallel'] / out['first-hitting']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint or run folder")
    src.add_argument("--preset", default="tiny", choices=list(PRESETS), help="a preset's fresh weights")
    ap.add_argument("--init", default="bd3lm", choices=["bd3lm", "random"], help="fresh weights: how")
    ap.add_argument("--drafts", help="JSONL drafts (default: draft --n here)")
    ap.add_argument("--random-drafts", action="store_true", help="random tokens and confidences as drafts")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--n", type=int, default=64, help="drafts to refine")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tokens-per-step", type=int, default=4)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--rows", type=int, default=256, help="rows of the per-row table")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-refine", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    tok = load_tokenizer(getattr(model.config, "tokenizer", "gpt2"))
    print(f"model: {args.model or f'{args.preset} ({args.init} init)'}; {torch.get_num_threads()} threads")
    recs = get_drafts(model, tok, args)
    row_costs(model, recs, args)
    if not args.skip_refine:
        refine_times(model, tok, recs, args)


if __name__ == "__main__":
    main()
