"""`did quickstart`: the whole method on the bundled corpus, in minutes, on a laptop CPU.

    did quickstart --out quickstart            # ~15 minutes on 2 CPU cores, offline
    did quickstart --out qs --minutes 3        # a smaller, faster run

prepare -> train (mix-scale: drafting block 4 and the global block L) -> draft -> refine
(global re-mask of the lowest snapshot confidences) -> eval-ppl, then a report folder:
report.md, results.json, the samples as JSONL and PNG plots. Each stage is the library
function the matching subcommand calls.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.errors import DidError
from did_cli.util import finite_tree


@dataclass
class QuickstartConfig:
    """Settings of `did quickstart`."""

    out: str = "quickstart"
    """Report folder (data, run and samples go inside it)."""
    minutes: float = 15.0
    """Wall-time budget for the whole pipeline; training gets what the other stages leave."""
    samples: int = 128
    """Samples drafted, refined and scored."""
    seq_len: int = 128
    """Sequence length L of the quickstart model (and of the global refine block)."""
    preset: str = "quick"
    """Model preset (see did_cli.core.model_config.PRESETS)."""
    draft_block: int = 4
    """Drafting block size."""
    global_weight: float = 0.1
    """Mix-scale weight of the global block L during training (lambda)."""
    ratio: float = 0.1
    """Share of generated tokens re-masked by the global refine stage. Below the paper's 0.25
    because a model this small replaces what it re-masks with commoner tokens: at 0.25 the
    samples' entropy falls by ~7%, at 0.1 by ~3% (docs/results.md)."""
    control_top_p: float = 0.8
    """Nucleus mass of a second, lower-entropy set of drafts: the entropy control."""
    batch_size: int = 16
    """Training batch size."""
    lr: float = 1e-3
    """Peak learning rate (small models tolerate a large one)."""
    scorer: str | None = None
    """Gen-PPL scorer; None picks gpt2-large when reachable, else the on-disk SmolLM2 GGUF."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    seed: int = 0
    """Seed of training, drafting and refinement."""

    def check(self) -> None:
        from did_cli.errors import UsageError

        if self.minutes <= 0:
            raise UsageError(f"--minutes must be positive (got {self.minutes})")
        if self.samples < 2:
            raise UsageError(f"--samples must be at least 2 (got {self.samples})")
        if self.seq_len % self.draft_block:
            raise UsageError(f"--draft-block {self.draft_block} does not divide --seq-len {self.seq_len}")
        if not 0.0 < self.ratio <= 1.0:
            raise UsageError(f"--ratio {self.ratio} outside (0, 1]")


def _say(msg: str) -> None:
    print(f"did quickstart: {msg}", file=sys.stderr, flush=True)


def pick_scorer(spec: str | None, device: str) -> Any:
    """The best scorer available: `spec` when given; else gpt2-large (the paper's scorer) when
    the hub is reachable or it is cached; else the SmolLM2 GGUF found on disk."""
    from did_cli.evaluation.scorer import load_scorer
    from did_cli.util import hub_unreachable

    if spec:
        return load_scorer(spec, device=device)
    if hub_unreachable() is None:
        try:
            return load_scorer("gpt2-large", device=device)
        except DidError:
            pass
    return load_scorer(None, device=device)


def check_scorer_available(spec: str | None) -> None:
    """Fail before training when no scorer can possibly be loaded."""
    from did_cli.evaluation.scorer import GGUF_INSTALL, default_gguf_path
    from did_cli.util import hub_unreachable

    if spec is None and default_gguf_path() is not None:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise DidError(
                "the on-disk SmolLM2 scorer needs the gguf package: pip install gguf (or pip install "
                "'did-cli[scorer]')"
            )
    if spec:
        p = Path(spec).expanduser()
        if (p.suffix.lower() == ".gguf" or p.is_absolute() or spec.startswith(".")) and not p.exists():
            raise DidError(f"--scorer {spec}: no such file or folder")
        return
    if default_gguf_path() is None and hub_unreachable() is not None:
        try:  # gpt2-large may still sit in the local cache
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache("gpt2-large", "config.json"), str):
                return
        except Exception:
            pass
        raise DidError(
            f"no scorer available offline: install the on-disk scorer with `{GGUF_INSTALL}` or pass --scorer"
        )


class _Timer:
    """Wall time per stage, said on stderr as each one ends."""

    def __init__(self, budget: float):
        self.t0, self.budget, self.timings = time.perf_counter(), budget, {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, name: str, t: float) -> None:
        self.timings[name] = round(time.perf_counter() - t, 1)
        _say(f"{name} done in {self.timings[name]:.0f}s ({self.elapsed():.0f}s of {self.budget:.0f}s)")


def run(cfg: QuickstartConfig) -> dict:
    """Run the pipeline; returns the results dict also written to OUT/results.json."""
    from did_cli.io.data import PreparedData
    from did_cli.io.model_folder import load_model
    from did_cli.io.packing import prepare
    from did_cli.io.tokenizer import load_tokenizer
    from did_cli.pipeline import findings, report
    from did_cli.util import atomic_write, resolve_device

    cfg.check()
    check_scorer_available(cfg.scorer)
    timer = _Timer(cfg.minutes * 60.0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device).type

    t = time.perf_counter()
    _say("[1/5] preparing the bundled corpus")
    prepare(None, out / "data", seq_len=cfg.seq_len, progress=False)
    data = PreparedData(out / "data")
    timer.stage("prepare", t)

    trained = _train(cfg, out, device, timer)
    model, info = load_model(out / "run" / "best", device=device)
    ckpt = info["folder"]
    tok = load_tokenizer(model.config.tokenizer)
    drafts, control, refined = _sample(cfg, out, model, tok, str(ckpt), timer)

    t = time.perf_counter()
    _say("[5/5] scoring with an autoregressive model")
    scorer = pick_scorer(cfg.scorer, device)
    _say(f"scorer: {scorer.name}")
    from did_cli.evaluation.gen_ppl import gen_ppl

    res = {
        "draft": gen_ppl(drafts, scorer),
        "refined": gen_ppl(refined, scorer),
        "control": gen_ppl(control, scorer),
    }
    timer.stage("score", t)

    results = findings.results(cfg, res, data, drafts, refined, scorer.name)
    results.update(
        {
            "training": {
                k: v for k, v in trained.items() if isinstance(v, (int, float, str, list, dict)) or v is None
            },
            "checkpoint": str(ckpt),
            "config": dataclasses.asdict(cfg),
            "device": device,
            "torch": _torch_version(),
            "timings_s": timer.timings,
            "total_s": round(timer.elapsed(), 1),
        }
    )
    findings.judge_training(results, model.config.vocab_size, cfg.batch_size * cfg.seq_len, _say)
    _view(out, drafts, refined, res, tok)
    report.write_report(out, results, out / "run", drafts, refined)
    atomic_write(out / "results.json", json.dumps(finite_tree(results), indent=2) + "\n")
    d, r = results["draft"], results["refined"]
    _say(
        f"draft gen PPL {d['mean_ppl']:.2f} (entropy {d['mean_entropy']:.3f}) -> refined {r['mean_ppl']:.2f} "
        f"(entropy {r['mean_entropy']:.3f}): {results['verdict']}; report: {out / 'report.md'}"
    )
    return results


def _view(out: Path, drafts: list, refined: list, scores: dict, tok: Any) -> None:
    """OUT/view.html: `did show` of the drafts and their refinements, with their gen PPL."""
    from did_cli.pipeline.page import render_page, write_page

    names = {"draft": "draft.jsonl", "refined": "refined.jsonl"}
    evals = {"inputs": {names["draft"]: scores["draft"], names["refined"]: scores["refined"]}}
    write_page(
        render_page(drafts, refined, scores=evals, tokenizer=tok, limit=50, names=names),
        str(out / "view.html"),
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


VAL_ROWS = 1280
"""Validation rows of the quickstart's one evaluation: at L = 128 the per-row NELBO varies by
~0.9 nats from row to row (content more than noise), so 1280 rows give a standard error below
0.03 (measured: docs/quickstart.md)."""


def _train(cfg: QuickstartConfig, out: Path, device: str, timer: _Timer) -> dict:
    """Mix-scale training for whatever the budget leaves after the sampling and scoring stages;
    on a CPU those take about 45% of a 15-minute run, and they scale with the number of samples."""
    import torch

    from did_cli.training import TrainConfig, train

    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    # validation: one evaluation at the end, on enough rows for a standard error below 0.03
    # nats at both block sizes (docs/quickstart.md): 3 forward passes a row (1 noise draw at
    # the draft block, 2 at the global one), ~1.5 minutes on 2 CPU cores
    rest = (
        90.0
        + cfg.samples * (1.6 if device == "cpu" else 0.2)
        + VAL_ROWS * (0.075 if device == "cpu" else 0.0075)
    )
    limit = max(30.0, timer.budget - timer.elapsed() - rest)
    _say(
        f"[2/5] training preset {cfg.preset!r} on blocks {cfg.draft_block} and {cfg.seq_len} for "
        f"{limit / 60:.1f} min"
    )
    run_dir = out / "run"
    tcfg = TrainConfig(
        data=str(out / "data"),
        out=str(run_dir),
        preset=cfg.preset,
        block_sizes=[cfg.draft_block, "L"],
        block_weights=[1 - cfg.global_weight, cfg.global_weight],
        steps=1_000_000,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=100,
        ema=0.999,
        eval_every=0,
        eval_batches=max(1, VAL_ROWS // cfg.batch_size),
        save_every=100,
        keep_last=1,
        log_every=20,
        seed=cfg.seed,
        time_limit=limit,
        mixed_precision="auto",
        progress=True,
        resume=(run_dir / "checkpoints").is_dir(),  # a re-run continues the same model for another budget
    )
    trained = train(tcfg)
    timer.stage("train", t)
    return trained


def _sample(
    cfg: QuickstartConfig, out: Path, model: Any, tok: Any, ckpt: str, timer: _Timer
) -> tuple[list, list, list]:
    """Drafts, the entropy-control drafts, and the refined drafts (each also written as JSONL)."""
    from did_cli.sampling import DraftConfig, RefineConfig, draft, refine

    t = time.perf_counter()
    _say(
        f"[3/5] drafting {cfg.samples} samples of {cfg.seq_len} tokens (block {cfg.draft_block}, "
        "first-hitting)"
    )
    dcfg = DraftConfig(
        n=cfg.samples, length=cfg.seq_len, block_size=cfg.draft_block, batch_size=32, seed=cfg.seed
    )
    drafts = _save(out / "draft.jsonl", draft(model, dcfg, tokenizer=tok, model_path=ckpt))
    timer.stage("draft", t)

    # a control for entropy: refinement tends to lower entropy, and lower entropy alone lowers
    # gen PPL, so drafts at a lower nucleus mass give the draft's PPL-entropy trade-off
    t = time.perf_counter()
    ccfg = dataclasses.replace(dcfg, top_p=cfg.control_top_p)
    control = _save(
        out / f"draft_top_p{cfg.control_top_p}.jsonl", draft(model, ccfg, tokenizer=tok, model_path=ckpt)
    )
    timer.stage("control draft", t)

    t = time.perf_counter()
    _say(f"[4/5] global refinement of the {cfg.ratio:.0%} least confident tokens")
    rcfg = RefineConfig(stages=[(None, cfg.ratio)], confidence="snapshot", batch_size=32, seed=cfg.seed)
    refined = _save(out / "refined.jsonl", refine(model, drafts, rcfg, tokenizer=tok, model_path=ckpt))
    timer.stage("refine", t)
    return drafts, control, refined


def _save(path: Path, records: Any) -> list[dict]:
    """Write records to `path` as they come (a crash keeps the finished ones) and return them."""
    from did_cli.io.record_writer import RecordWriter

    kept = []
    with RecordWriter(path) as w:
        for rec in records:
            w.write(rec)
            kept.append(rec)
    return kept
