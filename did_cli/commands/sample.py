"""`did draft` and `did refine`: thin wrappers over did_cli.sampling.

Records go to stdout (or -o FILE), one whole line each, flushed as soon as a record is done;
progress and per-sample figures go to stderr. Options and inputs are checked against the
model's config.json before the weights are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from did_cli.commands.builder import command
from did_cli.commands.options import Opt, fields_of
from did_cli.errors import DidError, UsageError
from did_cli.sampling.sampler_config import DraftConfig, RefineConfig, SamplerConfig, format_stages

MODEL_HELP = "Checkpoint folder, or a run folder (its latest complete checkpoint)."


def _checkpoint(path: str) -> Path:
    from did_cli.io.checkpoint import resolve_checkpoint

    p = Path(path)
    # RUN/best and RUN/latest name checkpoints of run RUN without existing as folders
    if not p.exists() and not (p.name in ("best", "latest") and p.parent.is_dir()):
        raise DidError(f"--model {path}: no such folder")
    return resolve_checkpoint(p)


def _check_output(output: str, inputs: tuple = ()) -> None:
    """Fail on an unwritable -o, one of the inputs, or one another process is writing, before
    any heavy work (RecordWriter takes the lock later)."""
    from did_cli.io.outputs import check_output

    check_output(output, "-o", inputs)


def _text_option(values: Any, flag: str) -> None:
    """A prompt given on the command line must be text: bytes that are not UTF-8 (`$'caf\\xe9'`)
    arrive as unpaired surrogates that no tokenizer or record can hold."""
    for v in [values] if isinstance(values, str) else values or []:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            shown = v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(f"{flag} '{shown}': not UTF-8 text") from None


def _write_all(records, output: str, what: str, line) -> None:
    """Write `records` to `output` (stdout when '-'), one progress line each on stderr, ids
    escaped. When the run stops early, the error (or the stderr line of an interruption) names
    the recovery file that keeps the finished records."""
    from did_cli.io.record_writer import RecordWriter
    from did_cli.io.terminal import say

    w = RecordWriter(output, what)
    try:
        with w:
            for rec in records:
                w.write(rec)
                say(line(rec))
    except DidError as e:
        if w.kept is None or str(w.kept) in str(e):
            raise
        raise type(e)(f"{e} ({w.kept} keeps the {w.count} records written)") from None
    except BaseException:
        if w.kept is not None:
            say(f"did: {w.count} finished records kept in {w.kept}")
        raise


MODEL = Opt("model", type=str, default=..., help=MODEL_HELP)
OUTPUT = Opt("output", flags=("-o", "--output"), default="-", help="Output JSONL file ('-' = stdout).")
SAMPLER = fields_of(SamplerConfig, "sampler", "tokens_per_step", "threshold", "top_p", "batch_size", "seed")
PLACEMENT = fields_of(SamplerConfig, "device", "dtype", "allow_longer", "fast_path")


def _draft(**kw: Any) -> None:
    """Draft samples with block diffusion; records (with snapshot confidence) as JSONL."""
    from did_cli import sampling
    from did_cli.io.model_folder import load_model, read_config
    from did_cli.io.tokenizer import load_tokenizer
    from did_cli.sampling.prompts import resolve_prompts
    from did_cli.util import resolve_device

    model, output, prompt, prompts = kw.pop("model"), kw.pop("output"), kw.pop("prompt"), kw.pop("prompts")
    if prompt is not None and prompts is not None:
        raise UsageError("--prompt and --prompts exclude each other")
    _text_option(prompt, "--prompt")
    _text_option(kw.get("suffix"), "--suffix")
    kw["use_cache"] = not kw.pop("no_cache")
    cfg = DraftConfig(prompts=list(prompt) if prompt else None, **kw)
    path = _checkpoint(model)
    mcfg = read_config(path)
    length = cfg.check(mcfg.model_length)
    dev = resolve_device(cfg.device)
    _check_output(output, (prompts,))
    if prompts is not None:
        cfg.prompt_ids, cfg.prompts = sampling.read_prompts(prompts)
    tok = load_tokenizer(mcfg.tokenizer)
    resolve_prompts(cfg, tok, length)  # a prompt that does not fit fails before the weights load
    net, _ = load_model(path, device=dev)

    def line(rec: dict) -> str:
        rej = f", {rec['entropy_rejections']} redraws" if rec.get("entropy_rejections") else ""
        return (
            f"{rec['id']}: {len(rec['tokens'])} tokens, {rec['nfe']} NFEs ({rec['forward_passes']} forward "
            f"passes), {rec['seconds']:.2f} s{rej}"
        )

    _write_all(sampling.draft(net, cfg, tokenizer=tok, model_path=str(path)), output, "did draft", line)


draft = command(
    _draft,
    [
        MODEL,
        Opt("n", DraftConfig, flags=("-n", "--n")),
        *fields_of(DraftConfig, "length", "block_size"),
        *SAMPLER,
        *fields_of(DraftConfig, "var_length", "min_entropy", "max_retries", "entropy_fail"),
        Opt("no_cache", default=False, help="Recompute the whole prefix every call (slow; same tokens)."),
        *PLACEMENT,
        OUTPUT,
        Opt(
            "prompt",
            type=list[str],
            default=None,
            help="Prompt text (repeatable); -n samples per prompt continue it after BOS.",
        ),
        Opt(
            "prompts",
            type=str,
            default=None,
            help='JSONL file of {"id", "prompt"} lines (\'-\' = stdin); -n samples per prompt.',
        ),
        Opt("suffix", DraftConfig, type=str),
    ],
    name="draft",
    config=True,
)


def _refine(**kw: Any) -> None:
    """Re-mask the least confident tokens of drafts and regenerate them (global refine)."""
    from did_cli import sampling
    from did_cli.io.model_folder import load_model, read_config
    from did_cli.io.records import read_records, unique_ids
    from did_cli.io.tokenizer import load_tokenizer
    from did_cli.util import resolve_device

    source, model, output = kw.pop("input"), kw.pop("model"), kw.pop("output")
    cfg = RefineConfig(**dict(kw, stages=sampling.parse_stages(kw["stages"])))
    path = _checkpoint(model)
    mcfg = read_config(path)
    cfg.check(mcfg.model_length)
    dev = resolve_device(cfg.device)
    _check_output(output, (source,))

    tok = load_tokenizer(mcfg.tokenizer)
    need = ("id", "tokens", "confidence") if cfg.confidence == "snapshot" else ("id", "tokens")
    records = unique_ids(
        read_records(source, vocab_size=mcfg.vocab_size, need=need), "stdin" if source == "-" else source
    )
    if source != "-":
        # a file is checked whole before the weights load; stdin streams record by record
        records = list(records)
        for k, rec in enumerate(records, 1):
            sampling.check_record(rec, f"record {k} (id {rec.get('id')!r})", mcfg, tok, cfg)
    net, _ = load_model(path, device=dev)

    def line(rec: dict) -> str:
        st = rec["stages"][-len(cfg.stages) :]
        figs = ", ".join(
            f"B={s['block_size']} re-masked {len(s['remasked'])} changed {s['changed']}" for s in st
        )
        return (
            f"{rec['id']}: {figs}; {sum(s['nfe'] for s in st)} NFEs ({sum(s['forward_passes'] for s in st)} "
            f"forward passes), {sum(s['seconds'] for s in st):.2f} s"
        )

    recs = sampling.refine(net, records, cfg, tokenizer=tok, model_path=str(path))
    _write_all(recs, output, "did refine", line)


refine = command(
    _refine,
    [
        Opt("input", default="-", argument=True, help="Draft records (JSONL); '-' reads stdin."),
        MODEL,
        Opt(
            "stages",
            RefineConfig,
            type=str,
            to_text=format_stages,
            extra="As text: BLOCK:RATIO,... in order; BLOCK 'L' (or >= the length) = global pass. E.g. "
            "1024:0.25 or 64:0.3,L:0.2.",
        ),
        Opt("confidence", RefineConfig),
        *SAMPLER,
        *PLACEMENT,
        OUTPUT,
    ],
    name="refine",
    config=True,
)
