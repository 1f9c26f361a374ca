"""The quickstart's report: report.md with its plots, from the figures of findings.py."""

from __future__ import annotations

from pathlib import Path

from did_cli.io.outputs import write_bytes
from did_cli.pipeline.plots import plot_confidence, plot_ppl_pairs, plot_training
from did_cli.util import fmt, fmt_ci, fmt_pct


def untrained_text(check: dict) -> str:
    """The report's paragraph for a model that did not train (`training_check`)."""
    budget = (
        f"`--minutes {check['suggested_minutes']}`"
        if check.get("suggested_minutes")
        else "a larger `--minutes`"
    )
    return (
        f"**No conclusions: the model did not train** ({'; '.join(check['reasons'])}). Its samples are "
        "close to random text, so the draft and refined figures below say nothing about refinement. "
        f"Give it {budget} (about {check['target_steps']} training steps at this run's rate; `--minutes 15`, "
        "the default, gives the `quick` preset about 600 on an unloaded 2-core CPU), or re-run with the same "
        "`--out` to train the same model for another budget."
    )


def report_verdict(results: dict) -> str:
    """The report's reading of the comparisons: none from a model that did not train
    (`untrained_text`); else the verdict of `did_cli.evaluation.verdict` (the rule of `did
    eval-ppl`), then the entropy control's figures."""
    check = results.get("training_check") or {"trained": True}
    if not check["trained"]:
        return untrained_text(check)
    matched = results.get("draft_mean_gen_ppl_at_refined_entropy")
    tol = results.get("entropy_tolerance", 0.03)
    verdict = {
        "beats": "Refinement beats the drafts",
        "level": "Refinement is level with the drafts",
        "worse": "Refinement is worse than the drafts",
        "lower-entropy": "Refinement does NOT beat the drafts",
    }.get(results.get("verdict"), "No verdict")
    verdict += f": {results.get('verdict_reason', '')} (the rule: docs/eval-ppl.md; tolerance {tol:.0%})."
    if matched is not None:
        vs = results.get("refinement_vs_entropy_control")
        gap = results.get("gap_vs_entropy_control_ci")
        verdict += (
            f" Entropy control: drafts sampled with a lower nucleus down to the refined entropy would score "
            f"about {matched:.1f} (read off the two draft settings) against the refined "
            f"{results['refined']['mean_ppl']:.1f}"
            f"{' (gap ' + fmt_pct(gap['estimate']) + fmt_ci(gap) + ')' if gap else ''}: "
            + (
                "refinement also beats simply sampling more conservatively."
                if vs == "beats"
                else "refinement is level with simply sampling more conservatively (the interval holds 0)."
                if vs in ("level", None)
                else "in this run refinement does worse than simply sampling more conservatively."
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
    trained = (results.get("training_check") or {"trained": True})["trained"]
    verdict = report_verdict(results) if trained else "No verdict: the model did not train."
    lines = [
        "# did quickstart report",
        "",
        *([] if trained else [report_verdict(results), ""]),
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
