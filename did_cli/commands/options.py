"""Command-line options declared once, with defaults and --help texts from the settings
dataclasses.

An option is an `Opt`: the parameter it fills, its flags, and where its default and help come
from (a dataclass field: its default and the docstring under it), so a command, the library
and the docs cannot drift apart. Commands that share settings share the `Opt` lists (the
training options of `train` and `finetune-mixscale`, the sampler options of `draft` and
`refine`). `command(body, options)` gives `body(**values)` the signature Typer reads, so a
command function holds its logic only, not a list of 30 option declarations.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

_FROM_FIELD = object()
CONTEXT = "did_context"  # the parameter that receives Typer's context in commands with --config


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(inspect.getsource(klass)).body[0].body
        except (OSError, TypeError, SyntaxError):  # no source (frozen installs): no help texts
            continue
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(b, ast.Expr)
                and isinstance(getattr(b, "value", None), ast.Constant)
            ):
                docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


@dataclass(frozen=True)
class Opt:
    """One command-line option (or argument) filling parameter `name`."""

    name: str
    source: Any = None
    """Dataclass whose field `attr or name` gives the default and the help text (or a library
    function whose keyword default it is; the help text is then given here)."""
    flags: tuple[str, ...] = ()
    """Default: --name-with-dashes."""
    type: Any = None
    """Command-line type; default: that of the field's default (str for lists, typed as text)."""
    default: Any = _FROM_FIELD
    help: str | None = None
    """Default: the field's docstring."""
    extra: str = ""
    """Appended to the help text."""
    attr: str | None = None
    """The field's name when it differs from `name`."""
    argument: bool = False
    kw: dict = field(default_factory=dict, hash=False)
    """More typer.Option keywords (min=..., rich_help_panel=...)."""

    def resolve(self) -> tuple[Any, Any, str]:
        """(annotation, default value, help text)."""
        fname = self.attr or self.name
        default = self.default
        if default is _FROM_FIELD:
            default = _field_default(self.source, fname)
        if isinstance(default, (list, tuple)):  # typed as text on the command line: 4,L and 0.9,0.999
            default = ",".join(map(str, default))
        docs = field_docs(self.source) if dataclasses.is_dataclass(self.source) else {}
        help_text = self.help if self.help is not None else docs.get(fname, "")
        help_text = (help_text + (" " + self.extra if self.extra else "")).strip()
        typ = self.type or _field_type(self.source, fname, default)
        if default is None:
            typ = Optional[typ]
        return typ, default, help_text

    def parameter(self, optional: bool = False) -> inspect.Parameter:
        """The signature parameter Typer reads; `optional`: a required option may come from
        --config instead (checked after the file is read)."""
        typ, default, help_text = self.resolve()
        if optional and default is ...:
            typ, default, help_text = (
                Optional[typ],
                None,
                (help_text + " Required (here or in --config).").strip(),
            )
        if self.argument:
            info = typer.Argument(default, help=help_text, show_default=False, **self.kw)
        else:
            flags = self.flags or ("--" + self.name.replace("_", "-"),)
            info = typer.Option(default, *flags, help=help_text, **self.kw)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=typ)


_SIMPLE = (int, float, str, bool)


def _field_type(cls: type | None, name: str, default: Any) -> Any:
    """The command-line type of a field: its annotation when that is a plain type (None
    stripped), else the type of its default; lists and other structures are typed as text."""
    if cls is not None and dataclasses.is_dataclass(cls):
        hint = typing.get_type_hints(cls).get(name)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
        if len(args) == 1 and args[0] in _SIMPLE:
            return args[0]
    if default is not None and default is not ... and type(default) in _SIMPLE:
        return type(default)
    return str


def _field_default(cls: Any, name: str) -> Any:
    if cls is None:
        raise TypeError(f"option {name!r} needs a default or a source dataclass")
    if not dataclasses.is_dataclass(cls):  # a library function: its keyword default
        return inspect.signature(cls).parameters[name].default
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            return ...
    raise TypeError(f"{cls.__name__} has no field {name!r}")


def fields_of(cls: type, *names: str, **kw: Any) -> list[Opt]:
    """Options for the fields `names` of dataclass `cls` (keywords apply to all of them)."""
    return [Opt(n, source=cls, **kw) for n in names]


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
            from did_cli.commands import config_file

            ctx = values.pop(CONTEXT)
            values = config_file.apply(values, options, cmd_name, implicit, given=lambda n: explicit(n, ctx))
        return body(**values)

    params = [o.parameter(optional=config) for o in options]
    if config:
        from did_cli.commands.config_file import CONFIG_HELP

        if "config" in names:
            raise TypeError(f"{body.__name__} declares its own --config")
        params.append(
            Opt("config", type=Path, default=None, help=CONFIG_HELP, flags=("--config", "-c")).parameter()
        )
        params.append(inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__name__ = cmd.__qualname__ = cmd_name
    cmd.__doc__, cmd.__module__ = body.__doc__, body.__module__
    cmd.options = list(options)  # type: ignore[attr-defined]  # what --config files are checked against
    return cmd


def explicit(name: str, ctx: Any = None) -> bool:
    """Whether option `name` was given on the command line (not left at its default), in the
    command's context `ctx` (default: the current one)."""
    if ctx is None:
        import click

        ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


__all__ = ["Opt", "fields_of", "command", "field_docs", "explicit"]
