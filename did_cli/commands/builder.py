"""`command(body, options)`: a command function Typer can read, built from `Opt` declarations.

The body holds the command's logic only (`body(**values)`); the signature Typer reads comes from
the options, plus `--config FILE` (did_cli.commands.config_file) for commands that take one."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from did_cli.commands import config_file
from did_cli.commands.options import CONTEXT, Opt, explicit


def command(
    body: Callable[..., Any],
    options: list[Opt],
    name: str | None = None,
    config: bool = False,
    implicit: Callable[[dict[str, Any]], Any] | None = None,
) -> Callable[..., Any]:
    """A function with `options` as its signature that calls `body(**values)`; Typer reads
    the signature (and the annotations) to build the command. The body's docstring is the
    command's help. `config`: the command also takes --config FILE (did_cli.commands.config_file),
    whose values fill the options not given on the command line; `implicit(values)` may name
    one more file read under it (a resumed run's config.json)."""
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise TypeError(
            f"duplicate option in {body.__name__}: {sorted(n for n in names if names.count(n) > 1)}"
        )
    cmd_name = name or body.__name__

    def cmd(**values: Any) -> Any:
        if config:
            ctx = values.pop(CONTEXT)
            values = config_file.apply(values, options, cmd_name, implicit, given=lambda n: explicit(n, ctx))
        return body(**values)

    params = [o.parameter(optional=config) for o in options]
    if config:
        if "config" in names:
            raise TypeError(f"{body.__name__} declares its own --config")
        params.append(
            Opt(
                "config", type=Path, default=None, help=config_file.CONFIG_HELP, flags=("--config", "-c")
            ).parameter()
        )
        params.append(inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__name__ = cmd.__qualname__ = cmd_name
    cmd.__doc__, cmd.__module__ = body.__doc__, body.__module__
    cmd.options = list(options)  # type: ignore[attr-defined]  # what --config files are checked against
    return cmd


__all__ = ["command"]
