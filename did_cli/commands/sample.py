"""`did draft` and `did refine`: thin wrappers over did_cli.sampling and did_cli.refinement.

Records go to stdout (or -o FILE), one whole line each, flushed as soon as a record is done;
progress and per-sample figures go to stderr. Options and inputs are checked against the
model's config.json before the weights are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from did_cli.errors import DidError

MODEL_HELP = "Checkpoint folder, or a run folder (its latest complete checkpoint)."


def _checkpoint(path: str) -> Path:
    from did_cli.checkpoint import resolve_checkpoint

    p = Path(path)
    # RUN/best and RUN/latest name checkpoints of run RUN without existing as folders
    if not p.exists() and not (p.name in ("best", "latest") and p.parent.is_dir()):
        raise DidError(f"--model {path}: no such folder")
    return resolve_checkpoint(p)


def _check_output(output: str) -> None:
    """Fail on an unwritable -o before any heavy work (RecordWriter creates the file later)."""
    if output == "-":
        return
    p = Path(output)
    if p.is_dir():
        raise DidError(f"cannot write {p}: it is a directory")
    if not p.parent.is_dir():
        why = "is not a folder" if p.parent.exists() else "does not exist"
        raise DidError(f"cannot write {p}: {p.parent} {why}")


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def draft(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    n: int = typer.Option(16, "-n", "--n", help="Number of samples."),
    length: Optional[int] = typer.Option(None, "--length", help="Tokens per sample incl. BOS (default: the model's length)."),
    block_size: int = typer.Option(4, "--block-size", help="Drafting block size (divides the length)."),
    sampler: str = typer.Option("first-hitting", "--sampler", help="first-hitting (one token per call) or parallel."),
    tokens_per_step: Optional[int] = typer.Option(None, "--tokens-per-step", help="parallel: commit the K most confident positions per call."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="parallel: commit positions whose token probability is >= P."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus mass (1 = off)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples drafted together."),
    seed: int = typer.Option(0, "--seed", help="Run seed (sample i uses its own generator from (seed, i))."),
    var_length: bool = typer.Option(False, "--var-length", help="End each sample at its first generated EOS."),
    min_entropy: Optional[float] = typer.Option(None, "--min-entropy", help="Redraw samples whose last 256 tokens have unigram entropy (nats) below this, e.g. 4.0."),
    max_retries: int = typer.Option(10, "--max-retries", help="Redraws per sample under --min-entropy."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole prefix every call (slow; same tokens)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, or bf16/fp16 autocast for the model calls."),
    allow_longer: bool = typer.Option(False, "--allow-longer", help="Allow --length above the model's trained length."),
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL file ('-' = stdout)."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Prompt text (repeatable); -n samples per prompt continue it after BOS."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help='JSONL file of {"id", "prompt"} lines (\'-\' = stdin); -n samples per prompt.'),
    suffix: Optional[str] = typer.Option(None, "--suffix", help="Fixed last tokens of every sample (infilling)."),
) -> None:
    """Draft samples with block diffusion; records (with snapshot confidence) as JSONL."""
    from did_cli import sampling
    from did_cli.errors import UsageError
    from did_cli.model import read_config

    if prompt is not None and prompts is not None:
        raise UsageError("--prompt and --prompts exclude each other")
    cfg = sampling.DraftConfig(
        n=n, length=length, block_size=block_size, sampler=sampler, tokens_per_step=tokens_per_step,
        threshold=threshold, top_p=top_p, batch_size=batch_size, seed=seed, var_length=var_length,
        min_entropy=min_entropy, max_retries=max_retries, use_cache=not no_cache, device=device,
        dtype=dtype, allow_longer=allow_longer, prompts=list(prompt) if prompt else None, suffix=suffix,
    )
    path = _checkpoint(model)
    mcfg = read_config(path)
    length = cfg.check(mcfg.model_length)
    dev = sampling.resolve_device(device)
    _check_output(output)
    if prompts is not None:
        cfg.prompt_ids, cfg.prompts = sampling.read_prompts(prompts)

    from did_cli.model import load_model
    from did_cli.records import RecordWriter
    from did_cli.tokenizer import load_tokenizer

    tok = load_tokenizer(mcfg.tokenizer)
    sampling.resolve_prompts(cfg, tok, length)  # a prompt that does not fit fails before the weights load
    net, _ = load_model(path, device=dev)
    err = _console()
    with RecordWriter(output) as w:
        for rec in sampling.draft(net, cfg, tokenizer=tok, model_path=str(path)):
            w.write(rec)
            rej = f", {rec['entropy_rejections']} redraws" if rec.get("entropy_rejections") else ""
            err.print(f"{rec['id']}: {len(rec['tokens'])} tokens, {rec['nfe']} NFEs, {rec['seconds']:.2f} s{rej}")


def refine(
    input: str = typer.Argument("-", help="Draft records (JSONL); '-' reads stdin."),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    stages: str = typer.Option("L:0.25", "--stages", help="BLOCK:RATIO,... in order; BLOCK 'L' (or >= the length) = global pass. E.g. 1024:0.25 or 64:0.3,L:0.2."),
    confidence: str = typer.Option("snapshot", "--confidence", help="snapshot, posthoc or random: which tokens to re-mask."),
    sampler: str = typer.Option("first-hitting", "--sampler", help="first-hitting or parallel."),
    tokens_per_step: Optional[int] = typer.Option(None, "--tokens-per-step", help="parallel: K positions per call."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="parallel: probability threshold."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus mass (1 = off)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Records refined together."),
    seed: int = typer.Option(0, "--seed", help="Run seed (record r uses a generator from (seed, r's id))."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, or bf16/fp16 autocast."),
    allow_longer: bool = typer.Option(False, "--allow-longer", help="Accept records longer than the model's length."),
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL file ('-' = stdout)."),
) -> None:
    """Re-mask the least confident tokens of drafts and regenerate them (global refine)."""
    from did_cli import refinement, sampling
    from did_cli.model import read_config
    from did_cli.records import read_records

    cfg = refinement.RefineConfig(
        stages=refinement.parse_stages(stages), confidence=confidence, sampler=sampler,
        tokens_per_step=tokens_per_step, threshold=threshold, top_p=top_p, seed=seed,
        batch_size=batch_size, device=device, dtype=dtype, allow_longer=allow_longer,
    )
    path = _checkpoint(model)
    mcfg = read_config(path)
    cfg.check(mcfg.model_length)
    dev = sampling.resolve_device(device)
    _check_output(output)

    from did_cli.model import load_model
    from did_cli.records import RecordWriter
    from did_cli.tokenizer import load_tokenizer

    tok = load_tokenizer(mcfg.tokenizer)
    need = ("id", "tokens", "confidence") if confidence == "snapshot" else ("id", "tokens")
    records = read_records(input, vocab_size=mcfg.vocab_size, need=need)
    if input != "-":
        # a file is checked whole before the weights load; stdin streams record by record
        records = list(records)
        for k, rec in enumerate(records, 1):
            refinement.check_record(rec, f"record {k} (id {rec.get('id')!r})", mcfg, tok, cfg)
    net, _ = load_model(path, device=dev)
    err = _console()
    with RecordWriter(output) as w:
        for rec in refinement.refine(net, records, cfg, tokenizer=tok, model_path=str(path)):
            w.write(rec)
            st = rec["stages"][-len(cfg.stages):]
            figs = ", ".join(f"B={s['block_size']} re-masked {len(s['remasked'])} changed {s['changed']}" for s in st)
            err.print(f"{rec['id']}: {figs}; {sum(s['nfe'] for s in st)} NFEs, {sum(s['seconds'] for s in st):.2f} s")
