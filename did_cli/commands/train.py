"""`did train` and `did finetune-mixscale`: options -> TrainConfig -> did_cli.train.train."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from did_cli.config import ConfigError, parse_clip, parse_float_list
from did_cli.errors import UsageError


def _field_docs() -> dict[str, str]:
    """TrainConfig field docstrings (the string literal under each field) for --help texts."""
    from did_cli import train as mod

    src = inspect.getsource(mod.TrainConfig)
    body = ast.parse(src).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


try:
    _DOCS = _field_docs()
except (OSError, TypeError):  # no source available (frozen installs)
    _DOCS = {}


def _h(name: str, extra: str = "") -> str:
    return (_DOCS.get(name, "") + (" " + extra if extra else "")).strip()


def _block_sizes(text: str) -> list[Any]:
    out: list[Any] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part in ("L", "l", "length"):
            out.append("L")
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"--block-sizes {text!r}: expected integers or L, comma-separated") from None
    if not out:
        raise ConfigError("--block-sizes: empty list")
    return out


def _clip(text: Optional[str]) -> Any:
    """None (not given) -> None; 'auto'; 'none' -> (0, 1); 'BETA,OMEGA' -> tuple."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip().lower() == "none":
        return (0.0, 1.0)
    return parse_clip(text, "--clip")


def _betas(text: str) -> tuple[float, float]:
    vals = parse_float_list(text, "--betas")
    if len(vals) != 2 or not all(0.0 <= v < 1.0 for v in vals):
        raise ConfigError(f"--betas {text!r}: expected two numbers in [0, 1)")
    return vals[0], vals[1]


# Options shared by both commands. Typer reads defaults from the signature, so each command
# spells them out; values flow through _common().
def _common(**kw: Any) -> dict[str, Any]:
    kw["clip"] = _clip(kw["clip"])
    kw["betas"] = _betas(kw["betas"])
    if kw.get("mixed_precision") == "auto":
        kw["mixed_precision"] = None
    kw["data"], kw["out"] = str(kw["data"]), str(kw["out"])
    if kw.get("init") is not None:
        kw["init"] = str(kw["init"])
    kw["progress"] = not kw.pop("quiet")
    return kw


def _run(cfg_kw: dict[str, Any]) -> None:
    from did_cli.train import TrainConfig, train as run_train

    cfg = TrainConfig(**cfg_kw)
    try:
        run_train(cfg)
    except OSError as e:  # run folder not creatable, metrics not writable, full disk...
        from did_cli.errors import DidError

        raise DidError(f"cannot write {e.filename or cfg.out}: {e.strerror or e}") from None


def train(
    data: Path = typer.Option(..., "--data", help=_h("data")),
    out: Path = typer.Option(..., "--out", help=_h("out")),
    preset: str = typer.Option("tiny", "--preset", help=_h("preset")),
    block_sizes: str = typer.Option("4,L", "--block-sizes", help=_h("block_sizes", "Comma-separated, e.g. 4,L or 4,1024.")),
    block_weights: Optional[str] = typer.Option(None, "--block-weights", help=_h("block_weights", "Default: 0.9,0.1 for the default 4,L; equal otherwise.")),
    steps: int = typer.Option(1000, "--steps", help=_h("steps")),
    batch_size: int = typer.Option(16, "--batch-size", help=_h("batch_size")),
    grad_accum: int = typer.Option(1, "--grad-accum", help=_h("grad_accum")),
    lr: float = typer.Option(3e-4, "--lr", help=_h("lr")),
    warmup: int = typer.Option(2500, "--warmup", help=_h("warmup")),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help=_h("weight_decay")),
    betas: str = typer.Option("0.9,0.999", "--betas", help=_h("betas")),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help=_h("grad_clip")),
    ema: float = typer.Option(0.9999, "--ema", help=_h("ema")),
    eval_every: int = typer.Option(500, "--eval-every", help=_h("eval_every")),
    eval_batches: int = typer.Option(8, "--eval-batches", help=_h("eval_batches")),
    save_every: int = typer.Option(1000, "--save-every", help=_h("save_every")),
    keep_last: int = typer.Option(3, "--keep-last", help=_h("keep_last")),
    log_every: int = typer.Option(10, "--log-every", help=_h("log_every")),
    seed: int = typer.Option(0, "--seed", help=_h("seed")),
    resume: bool = typer.Option(False, "--resume", help=_h("resume")),
    init: Optional[str] = typer.Option(None, "--init", help=_h("init")),
    clip: Optional[str] = typer.Option(None, "--clip", help="t range: auto, none (= 0,1) or BETA,OMEGA. Default: 0,1, or the learned range stored with --init."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="no, bf16, fp16, or auto (bf16 on CUDA, else no)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help=_h("dropout")),
    model_length: Optional[int] = typer.Option(None, "--model-length", help=_h("model_length")),
    num_workers: int = typer.Option(0, "--num-workers", help=_h("num_workers")),
    on_nonfinite: str = typer.Option("stop", "--on-nonfinite", help=_h("on_nonfinite")),
    compile: bool = typer.Option(False, "--compile", help=_h("compile")),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", min=0, help=_h("time_limit", "In seconds.")),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a block-diffusion model on prepared data over one or several block sizes."""
    kw = dict(locals())
    sizes = _block_sizes(kw.pop("block_sizes"))
    bw = kw.pop("block_weights")
    if bw is not None:
        weights = parse_float_list(bw, "--block-weights")
    elif sizes == [4, "L"]:
        weights = [0.9, 0.1]  # the DiD mix: drafting block most of the time, the global block 10%
    else:
        weights = None
    _run(_common(block_sizes=sizes, block_weights=weights, **kw))


def finetune_mixscale(
    init: str = typer.Option(..., "--init", help=_h("init")),
    data: Path = typer.Option(..., "--data", help=_h("data")),
    out: Path = typer.Option(..., "--out", help=_h("out")),
    draft_block: int = typer.Option(4, "--draft-block", help="The small drafting block size (weight 1 - lambda)."),
    global_weight: float = typer.Option(0.1, "--global-weight", help="lambda: probability of the global block L per step."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: --budget-fraction x --baseline-steps)."),
    budget_fraction: float = typer.Option(0.26, "--budget-fraction", help="Fraction of the baseline fine-tuning budget (the paper: 26%)."),
    baseline_steps: int = typer.Option(150_000, "--baseline-steps", help="Baseline fine-tuning steps (BD3-LM: 150K)."),
    batch_size: int = typer.Option(16, "--batch-size", help=_h("batch_size")),
    grad_accum: int = typer.Option(1, "--grad-accum", help=_h("grad_accum")),
    lr: float = typer.Option(3e-4, "--lr", help=_h("lr")),
    warmup: int = typer.Option(2500, "--warmup", help=_h("warmup")),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help=_h("weight_decay")),
    betas: str = typer.Option("0.9,0.999", "--betas", help=_h("betas")),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help=_h("grad_clip")),
    ema: float = typer.Option(0.9999, "--ema", help=_h("ema")),
    eval_every: int = typer.Option(500, "--eval-every", help=_h("eval_every")),
    eval_batches: int = typer.Option(8, "--eval-batches", help=_h("eval_batches")),
    save_every: int = typer.Option(1000, "--save-every", help=_h("save_every")),
    keep_last: int = typer.Option(3, "--keep-last", help=_h("keep_last")),
    log_every: int = typer.Option(10, "--log-every", help=_h("log_every")),
    seed: int = typer.Option(0, "--seed", help=_h("seed")),
    resume: bool = typer.Option(False, "--resume", help=_h("resume")),
    clip: Optional[str] = typer.Option(None, "--clip", help="t range: auto, none (= 0,1) or BETA,OMEGA. Default: 0,1, or the learned range stored with --init."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="no, bf16, fp16, or auto (bf16 on CUDA, else no)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help=_h("dropout")),
    num_workers: int = typer.Option(0, "--num-workers", help=_h("num_workers")),
    on_nonfinite: str = typer.Option("stop", "--on-nonfinite", help=_h("on_nonfinite")),
    compile: bool = typer.Option(False, "--compile", help=_h("compile")),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", min=0, help=_h("time_limit", "In seconds.")),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Mix-scale fine-tune: block size --draft-block with weight 1-lambda, the global block L with lambda."""
    kw = dict(locals())
    draft = kw.pop("draft_block")
    lam = kw.pop("global_weight")
    frac, base = kw.pop("budget_fraction"), kw.pop("baseline_steps")
    if not 0.0 <= lam <= 1.0:
        raise UsageError(f"--global-weight {lam}: must be in [0, 1]")
    if kw["steps"] is None:
        if not frac > 0 or base < 1:
            raise UsageError("--budget-fraction must be > 0 and --baseline-steps >= 1")
        kw["steps"] = max(1, round(frac * base))
    _run(_common(block_sizes=[draft, "L"], block_weights=[1.0 - lam, lam], preset="tiny", model_length=None, **kw))

