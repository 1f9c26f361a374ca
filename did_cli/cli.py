"""The `did` command line: one explicit registry of subcommands.

Each subcommand lives in `did_cli/commands/<name>.py` as a thin function that turns options into
config objects and calls the library. Errors from the library become one-line messages:
usage errors exit 2, runtime failures exit 1, Ctrl-C exits 130.

    did prepare --out data/            # tokenise the bundled corpus
    did train --data data/ --out run/ --block-sizes 4,128
    did draft --model run/ -n 16 | did refine --model run/ - | did eval-ppl -
"""

from __future__ import annotations

import functools
import importlib
import sys

import typer

from did_cli.errors import DidError

app = typer.Typer(
    name="did",
    help="Diffusion in Diffusion: block-diffusion drafts refined by global diffusion.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# name -> (module under did_cli.commands, function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("prepare", "prepare", "Tokenise text into memory-mapped training rows."),
    "train": ("train", "train", "Train a block-diffusion model over one or several block sizes."),
    "finetune-mixscale": (
        "train",
        "finetune_mixscale",
        "Mix-scale fine-tune from a checkpoint (draft block + global block).",
    ),
    "draft": ("sample", "draft", "Draft samples with block diffusion and record snapshot confidence."),
    "refine": ("sample", "refine", "Re-mask low-confidence tokens and regenerate them (global refine)."),
    "eval-ppl": (
        "evaluate",
        "eval_ppl",
        "Generative perplexity of samples, or test perplexity of a checkpoint.",
    ),
    "show": ("show", "show", "Write an HTML page showing drafts, refinements and confidences."),
    "quickstart": (
        "quickstart",
        "quickstart",
        "Run the whole pipeline on the bundled corpus and write a report.",
    ),
}


def _help_only(name: str):
    """A command that is listed (with its help line) but not imported: `main` imports only the
    command being run, so `did eval-ppl` does not pay for importing the training stack."""

    def cmd() -> None:
        raise RuntimeError(f"did {name} was registered for --help only")

    return cmd


def _guarded(fn):
    """Turn library errors into one-line messages with the documented exit codes."""

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


def _register(only: str | None = None) -> None:
    """Register the subcommands. With `only`, just that one is imported (the others are listed
    for --help only); None imports all of them."""
    for name, (module, func, help_text) in COMMANDS.items():
        if only is None or name == only:
            fn = _guarded(getattr(importlib.import_module(f"did_cli.commands.{module}"), func))
        else:
            fn = _help_only(name)
        app.command(name=name, help=help_text)(fn)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    _register(wanted if wanted in COMMANDS else "")
    sys.exit(_run(argv))


def _click_class(name: str) -> type:
    """A class of the parser's exception tree (typer ships its own copy of click's), found
    from the public `typer.BadParameter` so that no private module is imported."""
    return next(k for k in typer.BadParameter.__mro__ if k.__name__ == name)


def _run(argv: list[str]) -> int:
    """Run the app; errors of the command-line parser itself (an unknown option or command, a
    value of the wrong type, a missing option) are one `did: error:` line and exit 2, like ours."""
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


if __name__ == "__main__":
    main()
