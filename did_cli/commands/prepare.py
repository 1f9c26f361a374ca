"""`did prepare`: options -> did_cli.data.prepare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def prepare(
    sources: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Text sources: .txt (one document per file), .jsonl/.json ('text' field), .parquet "
            "('text' column), optionally .gz/.xz/.bz2, folders of these, or a datasets hub name. "
            "None: the bundled corpus.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for train.bin, validation.bin and meta.json.")] = ...,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per row, BOS included (the model length L).")] = 1024,
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="'gpt2' (bundled, offline), a tokenizer folder, or a hub name.")] = "gpt2",
    val_docs: Annotated[Optional[int], typer.Option("--val-docs", help="Hold out the last N documents for validation.")] = None,
    val_fraction: Annotated[
        Optional[float],
        typer.Option("--val-fraction", help="Hold out the last fraction of documents for validation (0.05 when --val-docs is not given)."),
    ] = None,
    num_proc: Annotated[int, typer.Option("--num-proc", help="Tokenizer worker processes (with 1, the bundled fast tokenizer already uses every core).")] = 1,
) -> None:
    """Tokenise text into memory-mapped rows of --seq-len tokens, each starting with BOS."""
    from did_cli.data import prepare as run_prepare

    meta = run_prepare(sources, out, seq_len=seq_len, tokenizer=tokenizer, val_docs=val_docs,
                       val_fraction=val_fraction, num_proc=num_proc)
    parts = [f"{name} {s['rows']} rows / {s['tokens']} tokens / {s['docs']} docs" for name, s in meta["splits"].items()]
    typer.echo(f"did prepare: {'; '.join(parts)} (seq_len {meta['seq_len']}) -> {out}", err=True)
