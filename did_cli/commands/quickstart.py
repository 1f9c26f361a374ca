"""`did quickstart`: prepare -> train -> draft -> refine -> eval-ppl on the bundled corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", help="Report folder (data, run and samples go inside)."),
    minutes: float = typer.Option(15.0, "--minutes", help="Wall-time budget; training gets what the other stages leave."),
    samples: int = typer.Option(128, "--samples", help="Samples drafted, refined and scored."),
    seq_len: int = typer.Option(128, "--seq-len", help="Sequence length L (also the global refine block)."),
    preset: str = typer.Option("quick", "--preset", help="Model preset: tiny, quick, small, medium."),
    ratio: float = typer.Option(0.25, "--ratio", help="Share of generated tokens re-masked by the global refine stage."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Gen-PPL scorer (folder, .gguf, hub name); default: gpt2-large when reachable, else the on-disk SmolLM2 GGUF."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage."),
) -> None:
    from did_cli.quickstart import QuickstartConfig, run

    run(QuickstartConfig(out=str(out), minutes=minutes, samples=samples, seq_len=seq_len, preset=preset,
                         ratio=ratio, scorer=scorer, device=device, seed=seed))
