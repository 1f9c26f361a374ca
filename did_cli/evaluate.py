"""Evaluation: generative perplexity under an autoregressive scorer and unigram entropy.

`gen_ppl` follows the BD3-LM protocol (see did_cli/scorer.py for the scoring details): the
headline figure is the mean of per-sample perplexities, reported with the mean per-sample unigram
entropy, because repetitive (low-entropy) text also gets a low perplexity.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from did_cli.errors import DidError, UsageError


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of the empirical token-id distribution of one sample (0.0 when empty)."""
    n = len(tokens)
    if n == 0:
        return 0.0
    return -sum((c / n) * math.log(c / n) for c in Counter(tokens).values())


def sample_tokens(rec: dict) -> list[int]:
    """The ids a record's entropy is computed over: all tokens but the BOS at position 0 and
    any leftover [MASK] (when the record names its mask id)."""
    toks = rec.get("tokens") or []
    mask_id = (rec.get("model") or {}).get("mask_id")
    return [t for t in toks[1:] if t != mask_id]


def gen_ppl(records: list[dict], scorer: Any, batch_size: int = 8) -> dict:
    """Generative perplexity and entropy of sample records under `scorer`.

    Returns ``{"summary": {...}, "samples": [{id, ppl, nll, n_tokens, entropy}, ...]}``. The
    summary holds `mean_ppl` (mean of per-sample perplexities: the paper's figure), `pooled_ppl`
    (exp of total NLL over total scored tokens), `median_ppl`, `mean_entropy`, `n` (samples with
    at least one scored token), `n_empty` (samples with none; left out of the ppl figures) and
    the scorer's name.
    """
    if not records:
        raise DidError("no samples to evaluate")
    texts = []
    for i, r in enumerate(records):
        if not isinstance(r.get("text"), str):
            raise DidError(f"sample {r.get('id', i)!r} has no 'text' to score")
        texts.append(r["text"])
    scores = scorer.nll(texts, batch_size=batch_size)
    samples = []
    for i, (r, (nll, n)) in enumerate(zip(records, scores)):
        samples.append({
            "id": r.get("id", str(i)),
            "ppl": math.exp(nll / n) if n else None,
            "nll": nll,
            "n_tokens": n,
            "entropy": unigram_entropy(sample_tokens(r)) if "tokens" in r else None,
        })
    ppls = [s["ppl"] for s in samples if s["ppl"] is not None]
    ents = [s["entropy"] for s in samples if s["entropy"] is not None]
    tot_nll = sum(s["nll"] for s in samples)
    tot_n = sum(s["n_tokens"] for s in samples)
    summary = {
        "scorer": scorer.name,
        "n": len(ppls),
        "n_empty": len(samples) - len(ppls),
        "mean_ppl": statistics.fmean(ppls) if ppls else None,
        "pooled_ppl": math.exp(tot_nll / tot_n) if tot_n else None,
        "median_ppl": statistics.median(ppls) if ppls else None,
        "mean_entropy": statistics.fmean(ents) if ents else None,
        "scored_tokens": tot_n,
    }
    return {"summary": summary, "samples": samples}


def _rel(v: float | None, ref: float | None) -> float | None:
    if v is None or ref is None or ref == 0:
        return None
    return (v - ref) / ref


def compare(results: dict[str, dict]) -> list[dict]:
    """One row per input with relative changes of mean PPL and entropy against the first input.

    `results` maps an input name to a `gen_ppl` result (or its summary). Relative changes are
    fractions (-0.1 = 10% lower); the first row's are 0.
    """
    rows = []
    ref = None
    for name, res in results.items():
        s = res.get("summary", res)
        if ref is None:
            ref = s
        rows.append({
            "input": name,
            "n": s.get("n"),
            "mean_ppl": s.get("mean_ppl"),
            "pooled_ppl": s.get("pooled_ppl"),
            "median_ppl": s.get("median_ppl"),
            "mean_entropy": s.get("mean_entropy"),
            "rel_mean_ppl": _rel(s.get("mean_ppl"), ref.get("mean_ppl")),
            "rel_entropy": _rel(s.get("mean_entropy"), ref.get("mean_entropy")),
        })
    return rows


def check_thresholds(summary: dict, max_gen_ppl: float | None = None, min_entropy: float | None = None) -> list[str]:
    """One-line reasons why `summary` misses the given bars (empty when it meets them)."""
    s = summary.get("summary", summary)
    reasons = []
    if max_gen_ppl is not None:
        v = s.get("mean_ppl")
        if v is None or not math.isfinite(v):
            reasons.append(f"gen PPL is undefined (no scored tokens); --max-gen-ppl {max_gen_ppl:g}")
        elif v > max_gen_ppl:
            reasons.append(f"gen PPL {v:.3f} > --max-gen-ppl {max_gen_ppl:g}")
    if min_entropy is not None:
        v = s.get("mean_entropy")
        if v is None or not math.isfinite(v):
            reasons.append(f"entropy is undefined (no tokens); --min-entropy {min_entropy:g}")
        elif v < min_entropy:
            reasons.append(f"mean entropy {v:.3f} < --min-entropy {min_entropy:g}")
    return reasons


def plot_distributions(results: dict[str, dict], path: str | Path) -> Path:
    """Histograms of per-sample gen PPL (log scale) and entropy, one series per input."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DidError("--plot needs matplotlib: pip install matplotlib") from None
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
        ax1.hist(ppl, bins=bins, alpha=0.5, label=f"{name} (mean {r['summary']['mean_ppl'] or float('nan'):.1f})")
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
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise DidError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path


def test_ppl(
    model_path: str,
    data_dir: str,
    block_size: int | None = None,
    split: str = "validation",
    batch_size: int = 8,
    device: str | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> dict:
    """Test perplexity (the NELBO bound) of a diffusion checkpoint on a prepared split.

    t ~ U[1e-3, 1] with one t per block, the checkpoint's EMA weights (model.safetensors),
    BOS excluded from the token count. `block_size` defaults to the model's length (MDLM bound);
    `model_path` may be a checkpoint folder or a run folder (its latest checkpoint).
    Returns {nelbo, ppl, bits_per_token, tokens, rows, block_size, split, model}."""
    import math

    import torch

    from did_cli.checkpoint import resolve_checkpoint
    from did_cli.data import PreparedData
    from did_cli.diffusion import eval_nelbo
    from did_cli.model import load_model

    ckpt = resolve_checkpoint(model_path)
    data = PreparedData(data_dir)
    dev = torch.device(device if device and device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_model(ckpt, device=dev)
    cfg = model.config
    data.check_compatible(tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, seq_len=cfg.model_length)
    bs = block_size or cfg.model_length
    if bs <= 0 or cfg.model_length % bs:
        raise UsageError(f"--block-size {bs} does not divide the model length {cfg.model_length}")
    rows = data.rows(split)
    if len(rows) == 0:
        raise DidError(f"{data_dir}: split {split!r} has no rows")
    if max_rows:
        rows = rows[:max_rows]
    gen = torch.Generator(device=dev).manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = torch.as_tensor(rows[i : i + batch_size].astype("int64"), device=dev)
        s, n = eval_nelbo(model, batch, bs, cfg.mask_id, generator=gen)
        total, count = total + s, count + n
    nelbo = total / count
    return {
        "nelbo": nelbo,
        "ppl": math.exp(nelbo),
        "bits_per_token": nelbo / math.log(2),
        "tokens": count,
        "rows": len(rows),
        "block_size": bs,
        "split": split,
        "model": str(ckpt),
    }


# pytest would collect a module-level `test_*` function imported into a test file
test_ppl.__test__ = False  # type: ignore[attr-defined]
