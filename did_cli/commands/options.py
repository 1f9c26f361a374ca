"""Command-line options declared once, with defaults and --help texts from the settings
dataclasses.

An option is an `Opt`: the parameter it fills, its flags, and where its default and help come
from (a dataclass field: its default and the docstring under it), so a command, the library
and the docs cannot drift apart. Commands that share settings share the `Opt` lists (the
training options of `train` and `finetune-mixscale`, the sampler options of `draft` and
`refine`). `did_cli.commands.builder.command(body, options)` turns such a list into the
signature Typer reads.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import typer

from did_cli.commands.help_texts import HELP_TEXTS

_FROM_FIELD = object()
CONTEXT = "did_context"
"""The parameter that receives Typer's context in commands with --config."""


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) of a settings dataclass and its
    bases, as `tests/field_help.py` stored them in `help_texts`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(HELP_TEXTS.get(f"{klass.__module__}.{klass.__qualname__}", {}))
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
    to_text: Callable[[Any], str] | None = None
    """How the field's default is written on the command line (default: a list joined by commas)."""

    def resolve(self) -> tuple[Any, Any, str]:
        """(annotation, default value, help text)."""
        fname = self.attr or self.name
        default = self.default
        if default is _FROM_FIELD:
            default = _field_default(self.source, fname)
        if self.to_text is not None and default is not None and default is not ...:
            default = self.to_text(default)
        elif isinstance(default, (list, tuple)):  # typed as text on the command line: 4,L and 0.9,0.999
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


__all__ = ["CONTEXT", "Opt", "fields_of", "field_docs", "explicit"]
