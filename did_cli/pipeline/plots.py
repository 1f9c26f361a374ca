"""Plots a person can look at (PNG): score distributions, the training curve, draft vs refined
gen PPL, and the confidence of re-masked vs kept tokens. Each returns None without matplotlib
(except `plot_distributions`, which `eval-ppl --plot` asked for explicitly)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from did_cli.errors import DidError
from did_cli.io.outputs import write_bytes


def _save(fig, path, dpi: int) -> None:
    """Render in memory, then write as did_cli.io.outputs does (no half-written PNG, devices and
    pipes written straight through, symlinks followed)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=Path(str(path)).suffix[1:].lower() or "png")
    write_bytes(path, buf.getvalue())


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
        ax.plot(
            [e["step"] for e in train],
            [e["loss"] for e in train],
            color="0.7",
            lw=1,
            label="train loss (mixed blocks)",
        )
    keys = sorted(
        {k for e in evals for k in e if k.startswith("val_nelbo_b")},
        key=lambda k: int(k[len("val_nelbo_b") :]),
    )
    for k in keys:
        pts = [(e["step"], e[k]) for e in evals if k in e]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"validation NELBO, block {k[len('val_nelbo_b') :]}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("nats per token")
    ax.set_title("Training curve")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, 110)
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
    _save(fig, path, 110)
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
    bins = [10**v for v in _linspace(math.log10(lo), 0.0, 41)]
    ax.set_xscale("log")
    for vals, name in ((kept, "kept"), (remasked, "re-masked")):
        if vals:
            ax.hist(
                vals,
                bins=bins,
                alpha=0.6,
                label=f"{name} ({len(vals)} tokens)",
                weights=[1.0 / len(vals)] * len(vals),
            )
    ax.set_xlabel("snapshot confidence at commit time")
    ax.set_ylabel("share of tokens")
    ax.set_title("Which draft tokens the global refine stage regenerates")
    ax.legend()
    fig.tight_layout()
    _save(fig, path, 110)
    plt.close(fig)
    return path


def plot_distributions(results: dict[str, dict], path: str | Path) -> Path:
    """Histograms of per-sample gen PPL (log scale) and entropy, one series per input."""
    plt = _plt()
    if plt is None:
        raise DidError("--plot needs matplotlib: pip install matplotlib")
    path = Path(path)
    if not path.parent.is_dir():
        raise DidError(f"cannot write {path}: directory {path.parent} does not exist")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    all_ppl = [s["ppl"] for r in results.values() for s in r["samples"] if s["ppl"]]
    if all_ppl:
        lo, hi = math.log10(min(all_ppl)), math.log10(max(all_ppl))
        hi = hi if hi > lo else lo + 1
        bins = [10 ** (lo + (hi - lo) * k / 30) for k in range(31)]
    else:
        bins = 30
    scorer = None
    for name, r in results.items():
        scorer = r["summary"].get("scorer", scorer)
        ppl = [s["ppl"] for s in r["samples"] if s["ppl"]]
        ent = [s["entropy"] for s in r["samples"] if s["entropy"] is not None]
        ax1.hist(
            ppl, bins=bins, alpha=0.5, label=f"{name} (mean {r['summary']['mean_ppl'] or float('nan'):.1f})"
        )
        ax2.hist(ent, bins=30, alpha=0.5, label=name)
    ax1.set_xscale("log")
    ax1.set_xlabel("per-sample gen PPL")
    ax1.set_ylabel("samples")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("unigram entropy (nats)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"scorer: {scorer}", fontsize=9)
    fig.tight_layout()
    try:
        _save(fig, path, 100)
    except OSError as e:
        raise DidError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
