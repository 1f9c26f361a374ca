"""The `did` command line, built from the list of subcommands in `did_cli.commands.registry`.

Each subcommand lives in `did_cli/commands/<name>.py` as a thin function that turns options into
config objects and calls the library. Errors from the library become one-line messages:
usage errors exit 2, runtime failures exit 1, Ctrl-C exits 130.

    did prepare --out data/            # tokenise the bundled corpus
    did train --data data/ --out run/ --block-sizes 4,128
    did draft --model run/ -n 16 | did refine --model run/ - | did eval-ppl -

From Python (tests do this): `build_app()` is the real app, every command behind the real error
guard; `run(argv)` runs it as the console script does and returns the exit code.

Every failure is one line, `did: error: ...`, whatever raised it: our errors, running out of
memory (with what to make smaller), SIGTERM and SIGHUP (cleaned up like Ctrl-C, then the process
ends by that signal), and any other exception (its traceback with `did --verbose`). Text from
user data in a message is escaped. Warnings and log lines of libraries (torch, transformers,
accelerate, datasets) stay off stderr unless `did --verbose`.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

import typer

from did_cli.commands.registry import COMMANDS
from did_cli.errors import DidError
from did_cli.io.terminal import printable

SMALLER = {
    "prepare": "the sources (split very large files) or --num-proc",
    "train": "--batch-size (a larger --grad-accum keeps the global batch), the model (--preset, --hidden, "
    "--layers), --eval-batches or --clip-batches",
    "finetune-mixscale": "--batch-size (a larger --grad-accum keeps the global batch), --eval-batches or "
    "--clip-batches",
    "draft": "--batch-size, --length or --block-size",
    "refine": "--batch-size, or the records' length",
    "eval-ppl": "--batch-size",
    "show": "the input files",
    "quickstart": "--batch-size",
}
"""What to make smaller, per command, when memory runs out."""
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "accelerate", "torch", "safetensors")
_ALLOC = re.compile(r"out of memory|can't allocate memory|not enough memory|cannot allocate memory", re.I)
_SIZE = re.compile(r"(?:allocate|tried to allocate)\s+([\d.]+\s*[KMGTP]i?B|\d+ bytes)", re.I)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C (outputs closed, locks removed), then end
    by that signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def quiet_libraries(verbose: bool) -> None:
    """Keep library warnings and log lines off stderr unless `verbose` (did --verbose)."""
    if verbose:
        return
    for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.simplefilter("ignore")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def out_of_memory(command: str, e: BaseException) -> str:
    """The one line for an allocation that failed: how much, and what to make smaller."""
    m = _SIZE.search(str(e))
    size = ""
    if m:
        size = m.group(1)
        if size.endswith(" bytes"):
            size = f"{int(size.split()[0]) / 2**30:.1f} GiB"
        size = f" (could not allocate {size})"
    return f"out of memory{size}; make smaller: {SMALLER.get(command, 'the inputs or --batch-size')}"


def _is_parser_exception(e: BaseException) -> bool:
    return isinstance(e, (typer.Exit, typer.Abort, _click_class("ClickException")))


HELP = "Diffusion in Diffusion: block-diffusion drafts refined by global diffusion."


def _help_only(name: str) -> Callable[[], None]:
    """A command that is listed (with its help line) but not imported: `main` imports only the
    command being run, so `did eval-ppl` does not pay for importing the training stack."""

    def cmd() -> None:
        raise RuntimeError(f"did {name} was registered for --help only")

    return cmd


def guarded(fn: Callable[..., Any], name: str = "") -> Callable[..., Any]:
    """`fn` with every failure turned into one line and the documented exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        handlers = {}
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                handlers[sig] = signal.signal(sig, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except DidError as e:
            _error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _echo("did: interrupted")
            raise typer.Exit(130) from None
        except Terminated as t:
            _echo(f"did: terminated ({signal.Signals(t.signum).name})")
            _end_by(t.signum, handlers)
        except BrokenPipeError:
            # a closed downstream pipe (`| head`) is not an error of ours
            sys.stderr.close()
            raise typer.Exit(0) from None
        except MemoryError as e:
            _error(out_of_memory(name, e))
            raise typer.Exit(1) from None
        except Exception as e:
            if _is_parser_exception(e):
                raise
            if isinstance(e, RuntimeError) and _ALLOC.search(str(e)):
                _error(out_of_memory(name, e))
                raise typer.Exit(1) from None
            if os.environ.get("DID_VERBOSE"):
                raise
            _error(f"internal error ({type(e).__name__}: {e}); `did --verbose {name} ...` shows where")
            raise typer.Exit(1) from None
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)

    return wrapper


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _echo(line: str) -> None:
    try:
        typer.echo(line, err=True)
    except (OSError, ValueError):  # stderr closed or its terminal gone
        pass


def _error(msg: str) -> None:
    _echo(f"did: error: {printable(' '.join(msg.split()) if chr(10) in msg else msg)}")


def _end_by(signum: int, handlers: dict) -> None:
    """End the process by signal `signum` (its default action), as if it had not been caught."""
    signal.signal(signum, signal.SIG_DFL)
    handlers.pop(signum, None)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os.kill(os.getpid(), signum)
    raise typer.Exit(128 + signum)  # reached only where the signal is blocked


def build_app(only: str | None = None) -> typer.Typer:
    """The Typer app with every subcommand of the registry. With `only`, just that command is
    imported (the others are listed for --help only); None imports all of them."""
    app = typer.Typer(
        name="did", help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    app.callback()(_options)
    for name, (module, func, help_text) in COMMANDS.items():
        if only is None or name == only:
            fn = guarded(getattr(importlib.import_module(f"did_cli.commands.{module}"), func), name)
        else:
            fn = _help_only(name)
        app.command(name=name, help=help_text)(fn)
    return app


def _options(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Show the warnings and log lines of libraries (torch, transformers, ...) and the traceback "
        "of an internal error. Also DID_VERBOSE=1.",
    ),
) -> None:
    """Options of `did` itself, given before the command: `did --verbose draft ...`."""
    if verbose:
        os.environ["DID_VERBOSE"] = "1"
    quiet_libraries(bool(os.environ.get("DID_VERBOSE")))


def _click_class(name: str) -> type:
    """A class of the parser's exception tree (typer ships its own copy of click's), found
    from the public `typer.BadParameter` so that no private module is imported."""
    return next(k for k in typer.BadParameter.__mro__ if k.__name__ == name)


def run(argv: list[str], app: typer.Typer | None = None) -> int:
    """Run `did` with `argv` and return its exit code. Errors of the command-line parser itself
    (an unknown option or command, a value of the wrong type, a missing option) are one
    `did: error:` line and exit 2, like ours."""
    from did_cli.io.targets import guard_std_streams

    guard_std_streams()
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
        _error(f"{msg} (see `{cmd} --help`)")
        return 2
    except _click_class("ClickException") as e:
        _error(e.format_message())
        return e.exit_code
    except typer.Abort:
        _echo("did: interrupted")
        return 130
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. The work is done when `run` returns: the objects left are
    frozen out of the garbage collector, which at exit would otherwise walk every object torch
    and transformers made (seconds of CPU, far more on a loaded machine, even after Ctrl-C)."""
    rc = run(sys.argv[1:] if argv is None else argv)
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    main()
