"""Generative perplexity under an autoregressive scorer, and unigram entropy.

`gen_ppl` follows the BD3-LM protocol (see did_cli/evaluation/scorer.py for the scoring details): the
headline figure is the mean of per-sample perplexities, reported with the mean per-sample unigram
entropy, because repetitive (low-entropy) text also gets a low perplexity.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from did_cli.errors import DidError
from did_cli.util import unigram_entropy


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
        samples.append(
            {
                "id": r.get("id", str(i)),
                "ppl": math.exp(nll / n) if n else None,
                "nll": nll,
                "n_tokens": n,
                "entropy": unigram_entropy(sample_tokens(r)) if "tokens" in r else None,
            }
        )
    ppls = [s["ppl"] for s in samples if s["ppl"] is not None]
    ents = [s["entropy"] for s in samples if s["entropy"] is not None]
    tot_nll = sum(s["nll"] for s in samples)
    tot_n = sum(s["n_tokens"] for s in samples)
    summary = {
        "scorer": scorer.name,
        "cleanup": bool(getattr(scorer, "cleanup", False)),
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


def compare(
    results: dict[str, dict], control: tuple[str, dict] | None = None, tolerance: float | None = None
) -> list[dict]:
    """One row per input with relative changes of mean PPL and entropy against the first input.

    `results` maps an input name to a `gen_ppl` result (or its summary). Relative changes are
    fractions (-0.1 = 10% lower); the first row's are 0. When an input holds the same sample ids
    as the first (paired sets) and per-sample figures are given, its row also carries paired
    bootstrap 95% intervals of both changes (`rel_mean_ppl_ci`, `rel_entropy_ci`: [lo, hi]),
    the number of pairs, and the verdict of `did_cli.evaluation.verdict` (`verdict`: beats /
    level / worse / lower-entropy, and `verdict_reason`). `control` is (name, result) of the
    first input's model sampled at a lower nucleus: it gets a row of its own (`"control": true`,
    no verdict), and the other rows the interval of their gap to the first input read at their
    entropy (`gap_vs_control_ci`).
    """
    from did_cli.evaluation import verdict as vd

    tol = vd.ENTROPY_TOLERANCE if tolerance is None else tolerance
    items = list(results.items())
    ref_res = items[0][1]
    ref = ref_res.get("summary", ref_res)
    ref_samples = ref_res.get("samples")
    ctrl_samples = control[1].get("samples") if control else None
    rows = []
    for k, (name, res) in enumerate(items + ([control] if control else [])):
        s = res.get("summary", res)
        row = {
            "input": name,
            "n": s.get("n"),
            "mean_ppl": s.get("mean_ppl"),
            "pooled_ppl": s.get("pooled_ppl"),
            "median_ppl": s.get("median_ppl"),
            "mean_entropy": s.get("mean_entropy"),
            "rel_mean_ppl": _rel(s.get("mean_ppl"), ref.get("mean_ppl")),
            "rel_entropy": _rel(s.get("mean_entropy"), ref.get("mean_entropy")),
        }
        is_control = control is not None and k == len(items)
        if k and ref_samples is not None and res.get("samples") is not None:
            cmp = vd.compare_sets(ref_samples, res["samples"], None if is_control else ctrl_samples, tol)
            ci_p, ci_e, gap = cmp["rel_ppl"], cmp["rel_entropy"], cmp["gap_vs_control"]
            row.update(
                {
                    "paired": ci_p["n"] if ci_p else None,
                    "rel_mean_ppl_ci": [ci_p["lo"], ci_p["hi"]] if ci_p else None,
                    "rel_entropy_ci": [ci_e["lo"], ci_e["hi"]] if ci_e else None,
                }
            )
            if is_control:
                row["control"] = True
            else:
                if control is not None:
                    row["gap_vs_control"] = gap["estimate"] if gap else None
                    row["gap_vs_control_ci"] = [gap["lo"], gap["hi"]] if gap else None
                row.update(verdict=cmp["verdict"], verdict_reason=cmp["reason"])
        elif is_control:
            row["control"] = True
        rows.append(row)
    return rows


def check_thresholds(
    summary: dict, max_gen_ppl: float | None = None, min_entropy: float | None = None
) -> list[str]:
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
