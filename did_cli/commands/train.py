"""`did train` and `did finetune-mixscale`: options -> TrainConfig -> did_cli.train.train."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from did_cli.config import ConfigError, parse_clip, parse_float_list
from did_cli.errors import UsageError
from did_cli.train import LENGTH_WORDS, TrainConfig


def _field_docs() -> dict[str, str]:
    """TrainConfig field docstrings (the string literal under each field) for --help texts."""
    src = inspect.getsource(TrainConfig)
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


_DEFAULTS = TrainConfig()


def _h(name: str, extra: str = "") -> str:
    return (_DOCS.get(name, "") + (" " + extra if extra else "")).strip()


def _opt(name: str, extra: str = "", **kw: Any) -> Any:
    """The option --NAME of TrainConfig field `name`: its default and --help text come from the
    dataclass, so the two commands and the library cannot drift apart."""
    default = getattr(_DEFAULTS, name)
    if isinstance(default, (list, tuple)):  # typed as text on the command line: 4,L and 0.9,0.999
        default = ",".join(map(str, default))
    return typer.Option(default, "--" + name.replace("_", "-"), help=_h(name, extra), **kw)


def _block_sizes(text: str) -> list[Any]:
    out: list[Any] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part in LENGTH_WORDS:
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


# Options whose command-line form differs from the TrainConfig field (text parsed by _common).
def _clip_opt() -> Any:
    return typer.Option(None, "--clip", help="t range: auto, none (= 0,1) or BETA,OMEGA. Default: 0,1, or the learned range stored with --init.")


def _mixed_precision_opt() -> Any:
    return typer.Option("auto", "--mixed-precision", help="no, bf16, fp16, or auto (bf16 on CUDA, else no).")


def _quiet_opt() -> Any:
    return typer.Option(False, "--quiet", "-q", help="No progress output.")


# Values of the options shared by both commands -> TrainConfig keywords.
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
    from did_cli.train import train as run_train

    cfg = TrainConfig(**cfg_kw)
    try:
        run_train(cfg)
    except OSError as e:  # run folder not creatable, metrics not writable, full disk...
        from did_cli.errors import DidError

        raise DidError(f"cannot write {e.filename or cfg.out}: {e.strerror or e}") from None


def train(
    data: Path = typer.Option(..., "--data", help=_h("data")),
    out: Path = typer.Option(..., "--out", help=_h("out")),
    preset: str = _opt("preset"),
    block_sizes: str = _opt("block_sizes", "Comma-separated, e.g. 4,L or 4,1024."),
    block_weights: Optional[str] = typer.Option(None, "--block-weights", help=_h("block_weights", "Default: 0.9,0.1 for the default 4,L; equal otherwise.")),
    steps: int = _opt("steps"),
    batch_size: int = _opt("batch_size"),
    grad_accum: int = _opt("grad_accum"),
    lr: float = _opt("lr"),
    warmup: int = _opt("warmup"),
    weight_decay: float = _opt("weight_decay"),
    betas: str = _opt("betas"),
    grad_clip: float = _opt("grad_clip"),
    ema: float = _opt("ema"),
    eval_every: int = _opt("eval_every"),
    eval_batches: int = _opt("eval_batches"),
    save_every: int = _opt("save_every"),
    keep_last: int = _opt("keep_last"),
    log_every: int = _opt("log_every"),
    seed: int = _opt("seed"),
    resume: bool = _opt("resume"),
    init: Optional[str] = _opt("init"),
    clip: Optional[str] = _clip_opt(),
    mixed_precision: str = _mixed_precision_opt(),
    dropout: Optional[float] = _opt("dropout"),
    model_length: Optional[int] = _opt("model_length"),
    num_workers: int = _opt("num_workers"),
    on_nonfinite: str = _opt("on_nonfinite"),
    compile: bool = _opt("compile"),
    time_limit: Optional[float] = _opt("time_limit", "In seconds.", min=0),
    quiet: bool = _quiet_opt(),
) -> None:
    """Train a block-diffusion model on prepared data over one or several block sizes."""
    kw = dict(locals())
    sizes = _block_sizes(kw.pop("block_sizes"))
    bw = kw.pop("block_weights")
    if bw is not None:
        weights = parse_float_list(bw, "--block-weights")
    elif sizes == _DEFAULTS.block_sizes:
        weights = list(_DEFAULTS.block_weights)  # the DiD mix: drafting block most of the time, the global block 10%
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
    batch_size: int = _opt("batch_size"),
    grad_accum: int = _opt("grad_accum"),
    lr: float = _opt("lr"),
    warmup: int = _opt("warmup"),
    weight_decay: float = _opt("weight_decay"),
    betas: str = _opt("betas"),
    grad_clip: float = _opt("grad_clip"),
    ema: float = _opt("ema"),
    eval_every: int = _opt("eval_every"),
    eval_batches: int = _opt("eval_batches"),
    save_every: int = _opt("save_every"),
    keep_last: int = _opt("keep_last"),
    log_every: int = _opt("log_every"),
    seed: int = _opt("seed"),
    resume: bool = _opt("resume"),
    clip: Optional[str] = _clip_opt(),
    mixed_precision: str = _mixed_precision_opt(),
    dropout: Optional[float] = _opt("dropout"),
    num_workers: int = _opt("num_workers"),
    on_nonfinite: str = _opt("on_nonfinite"),
    compile: bool = _opt("compile"),
    time_limit: Optional[float] = _opt("time_limit", "In seconds.", min=0),
    quiet: bool = _quiet_opt(),
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

