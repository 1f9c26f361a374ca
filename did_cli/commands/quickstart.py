"""`did quickstart`: prepare -> train -> draft -> refine -> eval-ppl on the bundled corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from did_cli.commands.options import Opt, command
from did_cli.quickstart import QuickstartConfig


def _quickstart(**kw: Any) -> None:
    """Run the whole pipeline on the bundled corpus and write a report."""
    from did_cli.quickstart import run

    run(QuickstartConfig(**dict(kw, out=str(kw["out"]))))


quickstart = command(_quickstart, [
    Opt("out", QuickstartConfig, type=Path),
    Opt("minutes", QuickstartConfig, help="Wall-time budget; training gets what the other stages leave."),
    Opt("samples", QuickstartConfig),
    Opt("seq_len", QuickstartConfig, help="Sequence length L (also the global refine block)."),
    Opt("preset", QuickstartConfig, help="Model preset: tiny, quick, small, medium."),
    Opt("ratio", QuickstartConfig, help="Share of generated tokens re-masked by the global refine stage."),
    Opt("scorer", QuickstartConfig),
    Opt("device", QuickstartConfig),
    Opt("seed", QuickstartConfig),
], name="quickstart")
