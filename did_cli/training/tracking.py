"""Experiment tracking through Accelerate's trackers (`--log-with tensorboard,wandb,...`).

metrics.jsonl stays the record of a run (always written, read by `did` itself); a tracker gets
the same numbers: every numeric field of every metrics.jsonl event, under `<event>/<field>`
(`train/loss`, `train/lr`, `eval/val_nelbo`, `eval/val_nelbo_b4`, ...) at the event's step, and
the run's resolved options as hyper-parameters. Local trackers (TensorBoard, ...) write under
RUN/logs/; TensorBoard: `tensorboard --logdir RUN/logs`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from did_cli.errors import DidError, UsageError

# --log-with name -> the package that provides it (the pyproject extra has the same name)
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "aim": "aim",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
PROJECT = "did"
LOG_DIR = "logs"


def parse_log_with(text: str | None) -> list[str]:
    """'tensorboard,wandb' -> the tracker names, each checked to be known and installed."""
    if text is None:
        return []
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not names or names == ["none"]:
        return []
    for n in names:
        if n not in TRACKERS:
            raise UsageError(f"--log-with {n!r}: choose from {', '.join(TRACKERS)} (comma-separated)")
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for n in names:
        if n not in available:
            raise DidError(
                f"--log-with {n}: the {TRACKERS[n]} package is not installed (pip install 'did-cli[{n}]')"
            )
    return list(dict.fromkeys(names))


def accelerator_kwargs(log_with: str | None, run: Path) -> dict[str, Any]:
    """Accelerator(...) keywords: the trackers and where local ones write (RUN/logs)."""
    names = parse_log_with(log_with)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {
        "log_with": names,
        "project_config": ProjectConfiguration(project_dir=str(run), logging_dir=str(run / LOG_DIR)),
    }


def hyperparameters(
    options: dict[str, Any] | None, fallback: dict[str, Any], model: dict[str, Any]
) -> dict[str, Any]:
    """Flat hyper-parameters every tracker accepts (numbers, texts, booleans): the resolved
    options (or the TrainConfig of a Python run) and the model's dimensions under `model/`."""
    src = dict(options["values"]) if options else {k: v for k, v in fallback.items() if k != "options"}
    flat = {k: _scalar(v) for k, v in src.items()}
    flat.update({f"model/{k}": _scalar(v) for k, v in model.items()})
    return flat


def _scalar(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def scalars(event: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl event, named `<event>/<field>`."""
    kind = event.get("event", "event")
    return {
        f"{kind}/{k}": float(v)
        for k, v in event.items()
        if k not in ("event", "step", "time")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def start(accel: Any, run: Path, hparams: dict[str, Any]) -> None:
    """init_trackers with the run's hyper-parameters (a no-op without --log-with)."""
    if not getattr(accel, "log_with", None):
        return
    init_kwargs = {"wandb": {"name": run.name, "dir": str(run / LOG_DIR)}, "trackio": {"name": run.name}}
    try:
        accel.init_trackers(PROJECT, config=hparams, init_kwargs=init_kwargs)
    except Exception as e:  # a tracker that cannot start (no login, no server): say which and why
        from did_cli.util import first_line

        raise DidError(
            f"--log-with: the tracker could not start ({type(e).__name__}: {first_line(e)})"
        ) from None


def log(accel: Any, event: dict[str, Any]) -> None:
    if getattr(accel, "log_with", None) and "step" in event:
        values = scalars(event)
        if values:
            accel.log(values, step=int(event["step"]))


def end(accel: Any) -> None:
    if getattr(accel, "log_with", None):
        accel.end_training()


__all__ = [
    "TRACKERS",
    "parse_log_with",
    "accelerator_kwargs",
    "hyperparameters",
    "scalars",
    "start",
    "log",
    "end",
]
