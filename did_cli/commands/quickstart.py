"""`did quickstart`: prepare -> train -> draft -> refine -> eval-ppl on the bundled corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from did_cli.commands.builder import command
from did_cli.commands.options import Opt
from did_cli.pipeline.end_to_end import QuickstartConfig


def _quickstart(**kw: Any) -> None:
    """Run the whole pipeline on the bundled corpus and write a report."""
    from did_cli.pipeline.end_to_end import run

    _check_out(kw["out"], kw.pop("force"))
    run(QuickstartConfig(**dict(kw, out=str(kw["out"]))))


def _check_out(out: Path, force: bool) -> None:
    """--out must be a folder (or a new path); a non-empty one that is not an earlier
    quickstart's (data/, run/) is refused without --force."""
    from did_cli.errors import DidError
    from did_cli.io.outputs import check_out_folder, describe_folder, is_empty_folder

    check_out_folder(out)
    if force or not out.is_dir() or is_empty_folder(out) or (out / "data").is_dir() or (out / "run").is_dir():
        return
    raise DidError(
        f"--out {out} holds files that are not a quickstart's ({describe_folder(out)}); pass --force to "
        "write into it anyway, or choose another --out"
    )


quickstart = command(
    _quickstart,
    [
        Opt("out", QuickstartConfig, type=Path),
        Opt("minutes", QuickstartConfig, help="Wall-time budget; training gets what the other stages leave."),
        Opt("samples", QuickstartConfig),
        Opt("seq_len", QuickstartConfig, help="Sequence length L (also the global refine block)."),
        Opt("preset", QuickstartConfig, help="Model preset: tiny, quick, small, medium."),
        Opt(
            "ratio", QuickstartConfig, help="Share of generated tokens re-masked by the global refine stage."
        ),
        Opt("scorer", QuickstartConfig),
        Opt("device", QuickstartConfig),
        Opt("seed", QuickstartConfig),
        Opt(
            "force",
            type=bool,
            default=False,
            help="Write into a non-empty --out that is not an earlier quickstart's.",
        ),
    ],
    name="quickstart",
)
