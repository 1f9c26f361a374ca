"""`did eval-ppl`: generative perplexity of sample files (a CI gate with thresholds), or, with
--model, the test perplexity of a checkpoint."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import typer

from did_cli.commands.builder import command
from did_cli.commands.options import Opt, fields_of
from did_cli.errors import UsageError
from did_cli.evaluation.eval_config import EvalConfig
from did_cli.util import fmt, fmt_ci, fmt_pct


def _check_json_target(path: str | None, flag: str = "--json", inputs: list[str] = ()) -> None:
    """Fail on an output that cannot be written, or that is one of the inputs, before the (slow)
    evaluation."""
    from did_cli.io.outputs import check_output

    check_output(path, flag, inputs)


GEN = "Generative perplexity of samples"
TEST = "Test perplexity of a checkpoint (--model)"


def _eval_ppl(inputs: list[str] | None, **kw: Any) -> None:
    """Generative perplexity and unigram entropy of samples (BD3-LM protocol); a CI gate with thresholds."""
    cfg = EvalConfig(**kw)
    if cfg.model is not None:
        _test_ppl(cfg)
    else:
        _gen_ppl(list(inputs or ["-"]), cfg)


def _console():
    from rich.console import Console

    err = Console(stderr=True)
    if not err.is_terminal:
        err.width = 160  # CI logs: keep long input paths and all columns on one line
    return err


def _test_ppl(cfg: EvalConfig) -> None:
    from did_cli.evaluation.nelbo_bound import test_ppl

    if cfg.data is None:
        raise UsageError("--model needs --data DIR (a prepared data folder)")
    _check_json_target(cfg.json)
    res = test_ppl(
        cfg.model,
        cfg.data,
        cfg.block_size,
        cfg.split,
        batch_size=cfg.batch_size,
        device=cfg.device,
        seed=cfg.seed,
        draws=cfg.draws,
        weight=cfg.nelbo_weight,
    )
    _emit_json(res, cfg.json)
    if cfg.json != "-":
        se = "" if res["nelbo_se"] is None else f" +- {res['nelbo_se']:.4f} (s.e.)"
        _console().print(
            f"test NELBO {res['nelbo']:.4f}{se} nats/token, PPL <= {res['ppl']:.3f}; {res['rows']} rows x "
            f"{res['draws']} draws, block {res['block_size']}, split {res['split']}",
            markup=False,
            highlight=False,
        )


def _read_inputs(inputs: list[str], cfg: EvalConfig) -> tuple[dict[str, list[dict]], Any]:
    """Every input and the control read and checked, and the outputs checked, before the (slow)
    scorer load: ({name: records}, (control name, records) or None)."""
    from did_cli.io.records import read_records

    if inputs.count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    if "-" in inputs and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError(
            "no input: pass sample files or pipe records into stdin (did draft ... | did eval-ppl)"
        )
    names = _unique_names(inputs)
    read = inputs + ([cfg.control] if cfg.control else [])
    _check_json_target(cfg.json, inputs=read)
    _check_json_target(cfg.plot, "--plot", read)
    if not 0.0 <= cfg.entropy_tolerance < 1.0:
        raise UsageError(f"--entropy-tolerance {cfg.entropy_tolerance}: a fraction in [0, 1), e.g. 0.03")
    recs = {name: list(read_records(src, need=("text", "tokens"))) for name, src in zip(names, inputs)}
    control = _read_control(cfg.control, names, recs) if cfg.control is not None else None
    return recs, control


def _print_results(err: Any, rows: list[dict], results: dict[str, dict]) -> None:
    """The table, a reason line per compared input, and a note per input with unscored samples."""
    err.print(_table(rows))
    for r in rows[1:]:
        if r.get("verdict_reason"):
            typer.echo(f"{r['input']}: {r['verdict']}: {r['verdict_reason']}", err=True)
    for name, res in results.items():
        if res["summary"]["n_empty"]:
            typer.echo(
                f"{name}: {res['summary']['n_empty']} sample(s) had no scorable token and are left out of "
                "the PPL figures",
                err=True,
            )


def _gen_ppl(inputs: list[str], cfg: EvalConfig) -> None:
    from did_cli.evaluation import gen_ppl as gp
    from did_cli.evaluation.scorer import load_scorer
    from did_cli.evaluation.self_scoring import self_scoring, warning_line

    recs, control = _read_inputs(inputs, cfg)
    sc = load_scorer(cfg.scorer, device=cfg.device)
    sc.cleanup = cfg.cleanup
    err = _console()
    # soft_wrap: a long scorer path stays on one line (greppable in CI logs)
    err.print(
        f"scorer: {sc.name} (context {sc.context}, loaded in {sc.load_seconds:.1f}s; text clean-up "
        f"{'on' if sc.cleanup else 'off'})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    found = self_scoring(recs, sc)
    warnings = [warning_line(found, sc)] if found else []
    for line in warnings:
        typer.echo(f"did: warning: {line}", err=True)
    results = {name: gp.gen_ppl(rs, sc, batch_size=cfg.batch_size) for name, rs in recs.items()}
    scored_control = (control[0], gp.gen_ppl(control[1], sc, batch_size=cfg.batch_size)) if control else None
    rows = gp.compare(results, scored_control, cfg.entropy_tolerance)
    _print_results(err, rows, results)
    multi = len(rows) > 1
    reasons = [
        f"{name}: {why}" if multi else why
        for name, res in results.items()
        for why in gp.check_thresholds(res["summary"], cfg.max_gen_ppl, cfg.min_entropy)
    ]
    if cfg.plot is not None:
        from did_cli.pipeline.plots import plot_distributions

        plot_distributions(results, cfg.plot)
        err.print(f"plot: {cfg.plot}", markup=False, highlight=False, soft_wrap=True)
    if cfg.json is not None:
        _emit_json(
            {
                "scorer": sc.name,
                "scorer_context": sc.context,
                "cleanup": sc.cleanup,
                "inputs": results,
                "control": {"input": scored_control[0], **scored_control[1]} if scored_control else None,
                "entropy_tolerance": cfg.entropy_tolerance,
                "compare": rows,
                "thresholds": {"max_gen_ppl": cfg.max_gen_ppl, "min_entropy": cfg.min_entropy},
                "passed": not reasons,
                "reasons": reasons,
                "self_scoring": found,
                "warnings": warnings,
            },
            cfg.json,
        )
    if reasons:
        for why in reasons:
            typer.echo(f"did eval-ppl: threshold not met: {why}", err=True)
        raise typer.Exit(1)


def _table(rows: list[dict]) -> Any:
    from rich.table import Table
    from rich.text import Text

    from did_cli.io.terminal import printable

    table = Table(title="generative perplexity (scorer above)", title_justify="left")
    multi = len(rows) > 1
    rows = [{**r, "input": r["input"] + " (control)"} if r.get("control") else r for r in rows]
    cols = ["input", "n", "gen PPL", "pooled", "median", "entropy"] + (
        ["PPL vs 1st [95% CI]", "entropy vs 1st [95% CI]", "verdict"] if multi else []
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "input" else "right", overflow="fold")
    for r in rows:
        cells = [
            Text(printable(r["input"])),  # a file name is user data: escaped, never markup
            str(r["n"]),
            fmt(r["mean_ppl"]),
            fmt(r["pooled_ppl"]),
            fmt(r["median_ppl"]),
            fmt(r["mean_entropy"], 3),
        ]
        if multi:
            cells += [
                fmt_pct(r["rel_mean_ppl"], "") + fmt_ci(r.get("rel_mean_ppl_ci")),
                fmt_pct(r["rel_entropy"], "") + fmt_ci(r.get("rel_entropy_ci")),
                _verdict_cell(r, r is rows[0]),
            ]
        table.add_row(*cells)
    return table


def _verdict_cell(r: dict, first: bool) -> str:
    if first:
        return ""
    if r.get("control"):
        return "control"
    return r.get("verdict") or "unpaired"


def _read_control(path: str, names: list[str], recs: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    """The --control records, checked to pair with the first input (same sample ids)."""
    from did_cli.io.records import read_records

    if len(names) < 2:
        raise UsageError(
            "--control needs two inputs at least: the reference (first) and what is compared with it"
        )
    if path == "-" and "-" in names:
        raise UsageError("--control -: stdin is already an input")
    control = list(read_records(path, need=("text", "tokens")))
    ids, ref = [r.get("id") for r in control], [r.get("id") for r in recs[names[0]]]
    if sorted(map(str, ids)) != sorted(map(str, ref)):
        raise UsageError(
            f"--control {path}: its sample ids differ from those of {names[0]}: draw it from the same model "
            "with the same -n and --seed (only --top-p lower)"
        )
    return ("stdin" if path == "-" else path), control


eval_ppl = command(
    _eval_ppl,
    [
        Opt(
            "inputs",
            type=list[str],
            default=None,
            argument=True,
            help="Sample JSONL files (did.sample/1); '-' reads stdin (the default).",
        ),
        Opt("scorer", EvalConfig, kw={"rich_help_panel": GEN}),
        Opt("cleanup", EvalConfig, flags=("--cleanup/--no-cleanup",), kw={"rich_help_panel": GEN}),
        Opt("batch_size", EvalConfig, kw={"min": 1}),
        Opt("json", EvalConfig),
        *fields_of(
            EvalConfig,
            "control",
            "entropy_tolerance",
            "max_gen_ppl",
            "min_entropy",
            "plot",
            kw={"rich_help_panel": GEN},
        ),
        Opt("device", EvalConfig),
        *fields_of(
            EvalConfig,
            "model",
            "data",
            "block_size",
            "split",
            "draws",
            "nelbo_weight",
            "seed",
            kw={"rich_help_panel": TEST},
        ),
    ],
    name="eval_ppl",
    config=True,
)


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
    text = json.dumps(
        obj, indent=2, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)
    )
    if target == "-":
        from did_cli.io.outputs import write_stdout

        write_stdout(text + "\n")
        return
    from did_cli.util import save_json

    save_json(obj, target)
