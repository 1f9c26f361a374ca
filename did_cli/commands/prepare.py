"""`did prepare`: options -> did_cli.io.packing.prepare (whose keyword defaults are the options')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from did_cli.commands.builder import command
from did_cli.commands.options import Opt
from did_cli.io.packing import prepare as run_prepare


def _prepare(sources: list[str] | None, out: Path, **kw: Any) -> None:
    """Tokenise text into memory-mapped rows of --seq-len tokens (each starting with BOS, or raw windows)."""
    meta = run_prepare(sources, out, **kw)
    parts = [
        f"{name} {s['rows']} rows / {s['tokens']} tokens / {s['docs']} docs"
        for name, s in meta["splits"].items()
    ]
    typer.echo(
        f"did prepare: {'; '.join(parts)} (seq_len {meta['seq_len']}, layout "
        f"{meta.get('row_layout', 'bos')}) -> {out}",
        err=True,
    )


prepare = command(
    _prepare,
    [
        Opt(
            "sources",
            type=list[str],
            default=None,
            argument=True,
            help="Text sources: .txt (one document per file), .jsonl/.json ('text' field), .parquet "
            "('text' column), "
            "optionally .gz/.xz/.bz2, folders of these, or a datasets hub name. None: the bundled corpus.",
        ),
        Opt("out", type=Path, default=..., help="Output folder for train.bin, validation.bin and meta.json."),
        Opt("seq_len", run_prepare, type=int, help="Tokens per row, BOS included (the model length L)."),
        Opt(
            "layout",
            run_prepare,
            type=str,
            help="Row layout: 'bos' (BOS + the next L-1 stream tokens) or 'raw' (raw L-token windows of "
            "the doc+EOS "
            "stream, no BOS: BD3-LM's OpenWebText rows, what its test perplexities are measured on).",
        ),
        Opt(
            "tokenizer",
            run_prepare,
            type=str,
            help="'gpt2' (bundled, offline), a model or tokenizer folder, a .gguf file (its tokenizer is "
            "converted once and cached), or a hub name; recorded in meta.json (name and fingerprint).",
        ),
        Opt("val_docs", run_prepare, type=int, help="Hold out the last N documents for validation."),
        Opt(
            "val_fraction",
            run_prepare,
            type=float,
            help="Hold out the last fraction of documents for validation (0.05 when --val-docs is not "
            "given).",
        ),
        Opt(
            "num_proc",
            run_prepare,
            type=int,
            help="Tokenizer worker processes (with 1, the bundled fast tokenizer already uses every core).",
        ),
        Opt(
            "force",
            run_prepare,
            type=bool,
            help="Replace what a non-empty --out holds (other prepared data, or files named like ours) "
            "instead of refusing.",
        ),
    ],
    name="prepare",
    config=True,
)
