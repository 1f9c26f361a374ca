"""Report folder of a pipeline run: plots (PNG) a person can look at, and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_training(run_dir: Path, path: Path) -> Path | None:
    """Training loss and validation NELBO per block size against the step."""
    plt = _plt()
    mpath = Path(run_dir) / "metrics.jsonl"
    if plt is None or not mpath.is_file():
        return None
    events = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([e["step"] for e in train], [e["loss"] for e in train], color="0.7", lw=1, label="train loss (mixed blocks)")
    keys = sorted({k for e in evals for k in e if k.startswith("val_nelbo_b")}, key=lambda k: int(k[len("val_nelbo_b"):]))
    for k in keys:
        pts = [(e["step"], e[k]) for e in evals if k in e]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"validation NELBO, block {k[len('val_nelbo_b'):]}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("nats per token")
    ax.set_title("Training curve")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppl_pairs(results: dict, path: Path) -> Path | None:
    """Per-sample gen PPL of each draft against its refined version (below the diagonal =
    refinement helped that sample), with both distributions."""
    plt = _plt()
    if plt is None:
        return None
    d = {s["id"]: s["ppl"] for s in results["per_sample"]["draft"]}
    pairs = [(d.get(s["id"].replace("refine", "draft")), s["ppl"]) for s in results["per_sample"]["refined"]]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        dr = [s["ppl"] for s in results["per_sample"]["draft"]]
        rf = [s["ppl"] for s in results["per_sample"]["refined"]]
        pairs = [(a, b) for a, b in zip(dr, rf) if a is not None and b is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    xs, ys = zip(*pairs)
    a1.scatter(xs, ys, s=10, alpha=0.6)
    lo, hi = min(xs + ys), max(xs + ys)
    a1.plot([lo, hi], [lo, hi], color="k", lw=1)
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("draft gen PPL")
    a1.set_ylabel("refined gen PPL")
    a1.set_title(f"Per sample ({sum(b < a for a, b in pairs)} of {len(pairs)} improved)")
    bins = [math.exp(v) for v in _linspace(math.log(lo), math.log(hi), 30)]
    a2.hist(xs, bins=bins, alpha=0.5, label=f"draft (mean {results['draft']['mean_ppl']:.1f})")
    a2.hist(ys, bins=bins, alpha=0.5, label=f"refined (mean {results['refined']['mean_ppl']:.1f})")
    a2.set_xscale("log")
    a2.set_xlabel("gen PPL")
    a2.set_title(f"Scorer: {results['scorer'].split(' (')[0]}")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)] if b > a else [a, a + 1e-6]


def plot_confidence(drafts: list[dict], refined: list[dict], path: Path) -> Path | None:
    """Snapshot confidence of the draft tokens that the refine stage re-masked vs those kept."""
    plt = _plt()
    if plt is None:
        return None
    remasked, kept = [], []
    for d, r in zip(drafts, refined):
        pos = set(r["stages"][0]["remasked"]) if r.get("stages") else set()
        for i, c in enumerate(d["confidence"]):
            if c is None:
                continue
            (remasked if i in pos else kept).append(c)
    fig, ax = plt.subplots(figsize=(7, 4))
    # log-spaced bins: an undertrained model's confidences span several orders of magnitude
    lo = max(1e-6, min(remasked + kept + [1.0]))
    bins = [10 ** v for v in _linspace(math.log10(lo), 0.0, 41)]
    ax.set_xscale("log")
    for vals, name in ((kept, "kept"), (remasked, "re-masked")):
        if vals:
            ax.hist(vals, bins=bins, alpha=0.6, label=f"{name} ({len(vals)} tokens)", weights=[1.0 / len(vals)] * len(vals))
    ax.set_xlabel("snapshot confidence at commit time")
    ax.set_ylabel("share of tokens")
    ax.set_title("Which draft tokens the global refine stage regenerates")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f}%"


def write_report(out: Path, results: dict, run_dir: Path, drafts: list[dict], refined: list[dict]) -> Path:
    """Plots and report.md into `out`; returns the report path."""
    out = Path(out)
    plots = {
        "training curve": plot_training(run_dir, out / "training_curve.png"),
        "gen PPL, draft vs refined": plot_ppl_pairs(results, out / "gen_ppl_draft_vs_refined.png"),
        "confidence of re-masked vs kept tokens": plot_confidence(drafts, refined, out / "confidence_remasked_vs_kept.png"),
    }
    d, r = results["draft"], results["refined"]
    cfg = results["config"]
    matched = results.get("draft_mean_gen_ppl_at_refined_entropy")
    if not results["refinement_helps"]:
        verdict = "Refinement did NOT lower the mean gen PPL at about the drafts' entropy in this run."
    elif abs(results["relative_change_entropy"] or 0) <= 0.03:
        verdict = "Refinement lowered the mean gen PPL at an entropy within 3% of the drafts'."
    else:
        verdict = "Refinement lowered the mean gen PPL by more than its drop in entropy accounts for."
    if matched is not None:
        # within 5% the two are level: the line is read off two noisy points
        gap = r["mean_ppl"] / matched - 1
        verdict += (f" Entropy control: drafts sampled with a lower nucleus down to the refined entropy would score "
                    f"about {matched:.1f} (read off the two draft settings) against the refined {r['mean_ppl']:.1f}, "
                    + ("so refinement also beats simply sampling more conservatively." if gap < -0.05 else
                       "so refinement is about level with simply sampling more conservatively." if gap <= 0.05 else
                       "so in this run refinement does not beat simply sampling more conservatively."))
    lines = [
        "# did quickstart report",
        "",
        f"Scorer: **{results['scorer']}**. Device: {results['device']}, torch {results['torch']}. "
        f"Total time {results['total_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in results['timings_s'].items())}).",
        "",
        f"Model: preset `{cfg['preset']}`, L = {cfg['seq_len']}, mix-scale training on blocks "
        f"{cfg['draft_block']} and {cfg['seq_len']} (weights {1 - cfg['global_weight']:.2f} / {cfg['global_weight']:.2f}), "
        f"{results['training'].get('step', '?')} steps; sampled from `{results['checkpoint']}` (best validation NELBO).",
        "",
        f"Draft: block {cfg['draft_block']}, first-hitting, top-p 0.9. Refine: one global stage (block {cfg['seq_len']}) "
        f"re-masking the {cfg['ratio']:.0%} lowest snapshot confidences.",
        "",
        "| | samples | mean gen PPL | median | pooled | mean entropy | 8-gram copy rate |",
        "|---|---|---|---|---|---|---|",
    ]
    c = results.get("control_draft")
    named = [("draft", d), ("refined", r)] + ([(f"control draft, top-p {c['top_p']}", c)] if c else [])
    for name, s in named:
        lines.append(f"| {name} | {s['n']} | {_fmt(s['mean_ppl'])} | {_fmt(s['median_ppl'])} | {_fmt(s['pooled_ppl'])} | "
                     f"{_fmt(s['mean_entropy'], 3)} | {_fmt(s.get('copy_rate_8gram'), 3)} |")
    lines += [
        "",
        f"Change from draft to refined: gen PPL {_pct(results['relative_change_gen_ppl'])}, "
        f"entropy {_pct(results['relative_change_entropy'])}. {verdict}",
        "",
        "Lower entropy (more repetitive text) also lowers gen PPL, so compare the two together. "
        "The copy rate is the share of the samples' 8-grams found in the training split: a model "
        "that memorises gets a flattering gen PPL. Numbers under different scorers are not comparable.",
        "",
    ]
    for title, p in plots.items():
        if p is not None:
            lines += [f"## {title[0].upper() + title[1:]}", "", f"![{title}]({p.name})", ""]
    lines += ["## Samples (draft, then refined)", ""]
    for dr, rf in list(zip(drafts, refined))[:3]:
        lines += [f"**{dr['id']}**", "", "```text", dr["text"].strip(), "```", "", "```text", rf["text"].strip(), "```", ""]
    lines += ["Files: `draft.jsonl`, `refined.jsonl` (did.sample/1 records), `results.json`, `run/` (checkpoints, metrics.jsonl).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
