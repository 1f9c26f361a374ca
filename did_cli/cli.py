"""The `did` command line, built from the list of subcommands in `did_cli.commands.registry`.

Each subcommand lives in `did_cli/commands/<name>.py` as a thin function that turns options into
config objects and calls the library. Errors from the library become one-line messages:
usage errors exit 2, runtime failures exit 1, Ctrl-C exits 130.

    did prepare --out data/            # tokenise the bundled corpus
    did train --data data/ --out run/ --block-sizes 4,128
    did draft --model run/ -n 16 | did refine --model run/ - | did eval-ppl -

From Python (tests do this): `build_app()` is the real app, every command behind the real error
guard; `run(argv)` runs it as the console script does and returns the exit code.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

import typer

from did_cli.commands.registry import COMMANDS
from did_cli.errors import DidError

HELP = "Diffusion in Diffusion: block-diffusion drafts refined by global diffusion."


def _help_only(name: str) -> Callable[[], None]:
    """A command that is listed (with its help line) but not imported: `main` imports only the
    command being run, so `did eval-ppl` does not pay for importing the training stack."""

    def cmd() -> None:
        raise RuntimeError(f"did {name} was registered for --help only")

    return cmd


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with library errors turned into one-line messages and the documented exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DidError as e:
            typer.echo(f"did: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("did: interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # a closed downstream pipe (`| head`) is not an error of ours
            sys.stderr.close()
            raise typer.Exit(0) from None

    return wrapper


def build_app(only: str | None = None) -> typer.Typer:
    """The Typer app with every subcommand of the registry. With `only`, just that command is
    imported (the others are listed for --help only); None imports all of them."""
    app = typer.Typer(
        name="did", help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    for name, (module, func, help_text) in COMMANDS.items():
        if only is None or name == only:
            fn = guarded(getattr(importlib.import_module(f"did_cli.commands.{module}"), func))
        else:
            fn = _help_only(name)
        app.command(name=name, help=help_text)(fn)
    return app


def _click_class(name: str) -> type:
    """A class of the parser's exception tree (typer ships its own copy of click's), found
    from the public `typer.BadParameter` so that no private module is imported."""
    return next(k for k in typer.BadParameter.__mro__ if k.__name__ == name)


def run(argv: list[str], app: typer.Typer | None = None) -> int:
    """Run `did` with `argv` and return its exit code. Errors of the command-line parser itself
    (an unknown option or command, a value of the wrong type, a missing option) are one
    `did: error:` line and exit 2, like ours."""
    if app is None:
        wanted = next((a for a in argv if not a.startswith("-")), None)
        app = build_app(wanted if wanted in COMMANDS else "")
    try:
        rc = app(args=argv, prog_name="did", standalone_mode=False)
    except _click_class("UsageError") as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `did` or `did COMMAND` without options
            typer.echo(ctx.get_help() if ctx is not None else "usage: did COMMAND [OPTIONS]", err=True)
            return 2
        msg = " ".join(e.format_message().split())
        cmd = ctx.command_path if ctx is not None else "did"
        typer.echo(f"did: error: {msg} (see `{cmd} --help`)", err=True)
        return 2
    except _click_class("ClickException") as e:
        typer.echo(f"did: error: {' '.join(e.format_message().split())}", err=True)
        return e.exit_code
    except typer.Abort:
        typer.echo("did: interrupted", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
