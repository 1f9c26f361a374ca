"""`did show`: a thin wrapper over did_cli.pipeline.page (one self-contained HTML page)."""

from __future__ import annotations

import typer

from did_cli.commands.builder import command
from did_cli.commands.options import Opt
from did_cli.errors import UsageError
from did_cli.pipeline.page import render_page


def _show(inputs: list[str], output: str, scores: str | None, limit: int, tokenizer: str | None) -> None:
    """Write one self-contained HTML page: each sample's tokens shaded by confidence, re-masked and
    changed tokens marked, draft beside refined, entropy, gen PPL and the settings."""
    from did_cli.io.records import read_records, validate
    from did_cli.io.tokenizer import load_tokenizer
    from did_cli.pipeline.page import check_target, tokenizer_of, write_page

    if len(inputs) > 2:
        raise UsageError(f"at most two inputs (SAMPLES.jsonl [REFINED.jsonl]), got {len(inputs)}")
    if inputs.count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    check_target(output, [*inputs, scores])
    # ids are checked against each record's own vocabulary here, against the tokenizer's below
    recs = [list(read_records(src, need=("id", "tokens"))) for src in inputs]
    tok = load_tokenizer(tokenizer or tokenizer_of([r for rs in recs for r in rs]))
    for src, rs in zip(inputs, recs):
        for rec in rs:
            validate(
                rec, vocab_size=tok.vocab_size, need=("id", "tokens"), source=f"{src} (id {rec['id']!r})"
            )
    evals = _load_scores(scores) if scores is not None else None
    names = {"draft": inputs[0], "refined": inputs[1] if len(inputs) > 1 else None}
    page = render_page(
        recs[0], recs[1] if len(recs) > 1 else None, scores=evals, tokenizer=tok, limit=limit, names=names
    )
    write_page(page, output)
    if output != "-":
        typer.echo(f"wrote {output}", err=True)


def _load_scores(path: str) -> dict:
    from did_cli.io.bounded import SCORES_FILE, read_json

    return read_json(path, f"--scores {path}", limit=SCORES_FILE, kind="the JSON of `did eval-ppl --json`")


show = command(
    _show,
    [
        Opt(
            "inputs",
            type=list[str],
            default=...,
            argument=True,
            help="SAMPLES.jsonl [REFINED.jsonl]: drafts and their refinements (paired by id), or one file "
            "alone; '-' reads stdin.",
        ),
        Opt(
            "output",
            flags=("-o", "--output"),
            type=str,
            default=...,
            help="HTML file to write ('-' = stdout).",
        ),
        Opt(
            "scores",
            type=str,
            default=None,
            help="JSON written by `did eval-ppl --json`: per-sample gen PPL, matched by id.",
        ),
        Opt(
            "limit",
            render_page,
            type=int,
            kw={"min": 0},
            help="Samples shown (0 = all); the summary covers every sample.",
        ),
        Opt(
            "tokenizer",
            type=str,
            default=None,
            help="Tokenizer that decodes the token ids: 'gpt2' (bundled), a folder, a .gguf file or a hub "
            "name. Default: the one the records name (model.tokenizer), else gpt2.",
        ),
    ],
    name="show",
)
