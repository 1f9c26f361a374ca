"""`did quickstart`: prepare -> train -> draft -> refine -> eval-ppl on the bundled corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from did_cli.quickstart import QuickstartConfig

_D = QuickstartConfig()  # the one source of the defaults


def quickstart(
    out: Path = typer.Option(Path(_D.out), "--out", help="Report folder (data, run and samples go inside)."),
    minutes: float = typer.Option(_D.minutes, "--minutes", help="Wall-time budget; training gets what the other stages leave."),
    samples: int = typer.Option(_D.samples, "--samples", help="Samples drafted, refined and scored."),
    seq_len: int = typer.Option(_D.seq_len, "--seq-len", help="Sequence length L (also the global refine block)."),
    preset: str = typer.Option(_D.preset, "--preset", help="Model preset: tiny, quick, small, medium."),
    ratio: float = typer.Option(_D.ratio, "--ratio", help="Share of generated tokens re-masked by the global refine stage."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Gen-PPL scorer (folder, .gguf, hub name); default: gpt2-large when reachable, else the on-disk SmolLM2 GGUF."),
    device: str = typer.Option(_D.device, "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed of every stage."),
) -> None:
    from did_cli.quickstart import run

    run(QuickstartConfig(out=str(out), minutes=minutes, samples=samples, seq_len=seq_len, preset=preset,
                         ratio=ratio, scorer=scorer, device=device, seed=seed))
