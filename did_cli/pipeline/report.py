"""The quickstart's report: the figures that read a draft/refine comparison honestly (copied
n-grams, the drafts' PPL at a matched entropy) and report.md with its plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from did_cli.io.outputs import write_bytes
from did_cli.pipeline.plots import plot_confidence, plot_ppl_pairs, plot_training
from did_cli.util import fmt, fmt_ci, fmt_pct


def ngram_copy_rate(
    samples: list[list[int]], train_rows: Any, n: int = 8, max_train_tokens: int = 20_000_000
) -> float | None:
    """Share of the samples' n-grams that also occur in the training split (memorisation check:
    a model that copies its training data gets a flattering gen PPL)."""
    import numpy as np

    def hashes(arr: np.ndarray) -> np.ndarray:
        arr = arr.astype(np.uint64)
        if len(arr) < n:
            return np.empty(0, np.uint64)
        h = np.zeros(len(arr) - n + 1, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                h = h * np.uint64(1_000_003) + arr[j : len(arr) - n + 1 + j]
        return h

    flat = np.asarray(train_rows[: max(1, max_train_tokens // train_rows.shape[1])]).reshape(-1)
    table = np.unique(hashes(flat))
    got = [hashes(np.asarray(s[1:], dtype=np.int64)) for s in samples if len(s) > n]
    got = [g for g in got if len(g)]
    if not got:
        return None
    allh = np.concatenate(got)
    return float(np.isin(allh, table).mean())


def draft_ppl_at_entropy(a: tuple[float, float], b: tuple[float, float], entropy: float) -> float | None:
    """Mean gen PPL the drafts would have at `entropy`, read off the line through two draft
    settings (entropy, PPL) in log-PPL (linear inside or near their range; None if the two
    settings have the same entropy)."""
    (e1, p1), (e2, p2) = a, b
    if None in (e1, p1, e2, p2) or abs(e1 - e2) < 1e-6 or p1 <= 0 or p2 <= 0:
        return None
    w = (entropy - e1) / (e2 - e1)
    return math.exp(math.log(p1) + w * (math.log(p2) - math.log(p1)))


def comparison_intervals(draft: list[dict], refined: list[dict], control: list[dict] | None) -> dict:
    """Paired bootstrap intervals of the quickstart's comparisons (per-sample gen_ppl figures,
    paired by id): the relative change of mean gen PPL and of mean entropy from draft to
    refined, and the gap of the refined mean PPL to the drafts' PPL read at the refined entropy
    off the draft and control settings (`draft_ppl_at_entropy`), each resample re-reading it."""
    import numpy as np

    from did_cli.evaluation import bootstrap as bs

    out: dict[str, Any] = {
        "relative_change_gen_ppl_ci": None,
        "relative_change_entropy_ci": None,
        "gap_vs_entropy_control_ci": None,
    }
    pp, pe = bs.paired(draft, refined, "ppl"), bs.paired(draft, refined, "entropy")
    if pp:
        out["relative_change_gen_ppl_ci"] = bs.relative_change(*pp)
    if pe:
        out["relative_change_entropy_ci"] = bs.relative_change(*pe)
    if control is None or not (pp and pe):
        return out
    cp, ce = bs.paired(draft, control, "ppl"), bs.paired(draft, control, "entropy")
    if not (cp and ce):
        return out
    (dp, rp), (de, re_), cpv, cev = pp, pe, cp[1], ce[1]

    def gap(i: np.ndarray) -> float:
        m = draft_ppl_at_entropy((de[i].mean(), dp[i].mean()), (cev[i].mean(), cpv[i].mean()), re_[i].mean())
        return float("nan") if m is None else rp[i].mean() / m - 1.0

    est, lo, hi = bs.bootstrap(gap, len(dp))
    if math.isfinite(est):
        out["gap_vs_entropy_control_ci"] = {
            "estimate": est,
            "lo": lo,
            "hi": hi,
            "level": bs.LEVEL,
            "n": len(dp),
        }
    return out


def _verdict(results: dict, r: dict, matched: float | None) -> str:
    """The report's reading of the comparisons; each claim follows its interval."""
    vs_draft = results.get("refinement_vs_draft")
    if not results["refinement_helps"]:
        verdict = "Refinement did NOT lower the mean gen PPL at about the drafts' entropy in this run" + (
            " (the interval of the PPL change holds 0: level)." if vs_draft == "level" else "."
        )
    elif vs_draft == "beats" and abs(results["relative_change_entropy"] or 0) <= 0.03:
        verdict = (
            "Refinement lowered the mean gen PPL (the whole interval is below 0) at an entropy "
            "within 3% of the drafts'."
        )
    else:
        verdict = "Refinement lowered the mean gen PPL by more than its drop in entropy accounts for."
    if matched is not None:
        vs = results.get("refinement_vs_entropy_control")
        gap = results.get("gap_vs_entropy_control_ci")
        verdict += (
            f" Entropy control: drafts sampled with a lower nucleus down to the refined entropy would score "
            f"about {matched:.1f} (read off the two draft settings) against the refined {r['mean_ppl']:.1f}"
            f"{' (gap ' + fmt_pct(gap['estimate']) + fmt_ci(gap) + ')' if gap else ''}, "
            + (
                "so refinement also beats simply sampling more conservatively."
                if vs == "beats"
                else "so refinement is level with simply sampling more conservatively (the interval holds 0)."
                if vs in ("level", None)
                else "so in this run refinement does worse than simply sampling more conservatively."
            )
        )
    return verdict


def _validation_lines(training: dict) -> list[str]:
    """Validation NELBO of the sampled (best) checkpoint with standard errors."""
    best = training.get("best") or {}
    sizes = training.get("block_sizes") or []
    figs = [
        f"block {b}: {best[f'val_nelbo_b{b}']:.3f} +- {best.get(f'val_nelbo_se_b{b}') or float('nan'):.3f}"
        for b in sizes
        if best.get(f"val_nelbo_b{b}") is not None
    ]
    if not figs:
        return []
    return [
        f"Validation NELBO of the sampled checkpoint (step {best.get('step')}, nats/token +- standard "
        "error over "
        f"{best.get('val_rows', '?')} rows): {'; '.join(figs)}.",
        "",
    ]


def write_report(out: Path, results: dict, run_dir: Path, drafts: list[dict], refined: list[dict]) -> Path:
    """Plots and report.md into `out`; returns the report path."""
    out = Path(out)
    plots = {
        "training curve": plot_training(run_dir, out / "training_curve.png"),
        "gen PPL, draft vs refined": plot_ppl_pairs(results, out / "gen_ppl_draft_vs_refined.png"),
        "confidence of re-masked vs kept tokens": plot_confidence(
            drafts, refined, out / "confidence_remasked_vs_kept.png"
        ),
    }
    d, r = results["draft"], results["refined"]
    cfg = results["config"]
    matched = results.get("draft_mean_gen_ppl_at_refined_entropy")
    verdict = _verdict(results, r, matched)
    lines = [
        "# did quickstart report",
        "",
        f"Scorer: **{results['scorer']}**. Device: {results['device']}, torch {results['torch']}. "
        f"Total time {results['total_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in results['timings_s'].items())}).",
        "",
        f"Model: preset `{cfg['preset']}`, L = {cfg['seq_len']}, mix-scale training on blocks "
        f"{cfg['draft_block']} and {cfg['seq_len']} (weights {1 - cfg['global_weight']:.2f} / "
        f"{cfg['global_weight']:.2f}), "
        f"{results['training'].get('step', '?')} steps; sampled from `{results['checkpoint']}` (best "
        "validation NELBO).",
        "",
        f"Draft: block {cfg['draft_block']}, first-hitting, top-p 0.9. Refine: one global stage (block "
        f"{cfg['seq_len']}) "
        f"re-masking the {cfg['ratio']:.0%} lowest snapshot confidences.",
        "",
        "| | samples | mean gen PPL | median | pooled | mean entropy | 8-gram copy rate |",
        "|---|---|---|---|---|---|---|",
    ]
    c = results.get("control_draft")
    named = [("draft", d), ("refined", r)] + ([(f"control draft, top-p {c['top_p']}", c)] if c else [])
    for name, s in named:
        lines.append(
            f"| {name} | {s['n']} | {fmt(s['mean_ppl'])} | {fmt(s['median_ppl'])} | "
            f"{fmt(s['pooled_ppl'])} | "
            f"{fmt(s['mean_entropy'], 3)} | {fmt(s.get('copy_rate_8gram'), 3)} |"
        )
    lines += [
        "",
        f"Change from draft to refined (paired by sample, 95% bootstrap intervals): gen PPL "
        f"{fmt_pct(results['relative_change_gen_ppl'])}{fmt_ci(results.get('relative_change_gen_ppl_ci'))}, "
        f"entropy {fmt_pct(results['relative_change_entropy'])}"
        f"{fmt_ci(results.get('relative_change_entropy_ci'))}. {verdict}",
        "",
        *_validation_lines(results.get("training") or {}),
        "",
        "Lower entropy (more repetitive text) also lowers gen PPL, so compare the two together. "
        "The copy rate is the share of the samples' 8-grams found in the training split: a model "
        "that memorises gets a flattering gen PPL. Numbers under different scorers are not comparable.",
        "",
    ]
    for title, p in plots.items():
        if p is not None:
            lines += [f"## {title[0].upper() + title[1:]}", "", f"![{title}]({p.name})", ""]
    lines += _sample_lines(out, drafts, refined)
    lines += [
        "Files: `draft.jsonl`, `refined.jsonl` (did.sample/1 records), `results.json`, `view.html`, "
        "`run/` (checkpoints, metrics.jsonl).",
        "",
    ]
    path = out / "report.md"
    write_bytes(path, "\n".join(lines))
    return path


def _sample_lines(out: Path, drafts: list[dict], refined: list[dict]) -> list[str]:
    """The report's samples section: a pointer to the HTML view and the first three pairs."""
    lines: list[str] = []
    lines += ["## Samples (draft, then refined)", ""]
    if (out / "view.html").is_file():
        lines += [
            "Every sample, each token shaded by its snapshot confidence, the re-masked and changed tokens "
            "marked, "
            "draft beside refined: [view.html](view.html) (`did show`, docs/show.md).",
            "",
        ]
    for dr, rf in list(zip(drafts, refined))[:3]:
        lines += [
            f"**{dr['id']}**",
            "",
            "```text",
            dr["text"].strip(),
            "```",
            "",
            "```text",
            rf["text"].strip(),
            "```",
            "",
        ]
    return lines
