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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.errors import DidError


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
    """Model preset (see did_cli.config.PRESETS)."""
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
        from did_cli.config import ConfigError

        if self.minutes <= 0:
            raise ConfigError(f"--minutes must be positive (got {self.minutes})")
        if self.samples < 2:
            raise ConfigError(f"--samples must be at least 2 (got {self.samples})")
        if self.seq_len % self.draft_block:
            raise ConfigError(f"--draft-block {self.draft_block} does not divide --seq-len {self.seq_len}")
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"--ratio {self.ratio} outside (0, 1]")


def _say(msg: str) -> None:
    print(f"did quickstart: {msg}", file=sys.stderr, flush=True)


def pick_scorer(spec: str | None, device: str) -> Any:
    """The best scorer available: `spec` when given; else gpt2-large (the paper's scorer) when
    the hub is reachable or it is cached; else the SmolLM2 GGUF found on disk."""
    from did_cli.data import _hub_unreachable
    from did_cli.scorer import load_scorer

    if spec:
        return load_scorer(spec, device=device)
    if _hub_unreachable() is None:
        try:
            return load_scorer("gpt2-large", device=device)
        except DidError:
            pass
    return load_scorer(None, device=device)


def check_scorer_available(spec: str | None) -> None:
    """Fail before training when no scorer can possibly be loaded."""
    from did_cli.data import _hub_unreachable
    from did_cli.scorer import GGUF_INSTALL, default_gguf_path

    if spec is None and default_gguf_path() is not None:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise DidError("the on-disk SmolLM2 scorer needs the gguf package: pip install gguf (or pip install 'did-cli[scorer]')")
    if spec:
        p = Path(spec).expanduser()
        if (p.suffix.lower() == ".gguf" or p.is_absolute() or spec.startswith(".")) and not p.exists():
            raise DidError(f"--scorer {spec}: no such file or folder")
        return
    if default_gguf_path() is None and _hub_unreachable() is not None:
        try:  # gpt2-large may still sit in the local cache
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache("gpt2-large", "config.json"), str):
                return
        except Exception:
            pass
        raise DidError(f"no scorer available offline: install the on-disk scorer with `{GGUF_INSTALL}` or pass --scorer")


def ngram_copy_rate(samples: list[list[int]], train_rows: Any, n: int = 8, max_train_tokens: int = 20_000_000) -> float | None:
    """Share of the samples' n-grams that also occur in the training split (memorisation check:
    a model that copies its training data gets a flattering gen PPL)."""
    import numpy as np

    def hashes(arr: "np.ndarray") -> "np.ndarray":
        arr = arr.astype(np.uint64)
        if len(arr) < n:
            return np.empty(0, np.uint64)
        h = np.zeros(len(arr) - n + 1, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                h = h * np.uint64(1_000_003) + arr[j : len(arr) - n + 1 + j]
        return h

    flat = np.asarray(train_rows[: max(1, max_train_tokens // train_rows.shape[1])]).reshape(-1)
    table = np.unique(hashes(flat))
    got = [hashes(np.asarray(s[1:], dtype=np.int64)) for s in samples if len(s) > n]
    got = [g for g in got if len(g)]
    if not got:
        return None
    allh = np.concatenate(got)
    return float(np.isin(allh, table).mean())


def draft_ppl_at_entropy(a: tuple[float, float], b: tuple[float, float], entropy: float) -> float | None:
    """Mean gen PPL the drafts would have at `entropy`, read off the line through two draft
    settings (entropy, PPL) in log-PPL (linear inside or near their range; None if the two
    settings have the same entropy)."""
    (e1, p1), (e2, p2) = a, b
    if None in (e1, p1, e2, p2) or abs(e1 - e2) < 1e-6 or p1 <= 0 or p2 <= 0:
        return None
    w = (entropy - e1) / (e2 - e1)
    return math.exp(math.log(p1) + w * (math.log(p2) - math.log(p1)))


def run(cfg: QuickstartConfig) -> dict:
    """Run the pipeline; returns the results dict also written to OUT/results.json."""
    import torch

    from did_cli import evaluate, report
    from did_cli.checkpoint import resolve_checkpoint
    from did_cli.data import PreparedData, prepare
    from did_cli.model import load_model
    from did_cli.refinement import RefineConfig, refine
    from did_cli.sampling import DraftConfig, draft
    from did_cli.tokenizer import load_tokenizer
    from did_cli.train import TrainConfig, train

    cfg.check()
    check_scorer_available(cfg.scorer)
    t0 = time.perf_counter()
    budget = cfg.minutes * 60.0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    def stage(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 1)
        _say(f"{name} done in {timings[name]:.0f}s ({time.perf_counter() - t0:.0f}s of {budget:.0f}s)")

    # 1. data
    t = time.perf_counter()
    _say("[1/5] preparing the bundled corpus")
    prepare(None, out / "data", seq_len=cfg.seq_len, progress=False)
    data = PreparedData(out / "data")
    stage("prepare", t)

    # 2. train: whatever the budget leaves after the sampling and scoring stages; on a CPU those
    # take about 45% of a 15-minute run, and they scale with the number of samples
    t = time.perf_counter()
    rest = 90.0 + cfg.samples * (1.6 if device == "cpu" else 0.2)
    limit = max(30.0, budget - (time.perf_counter() - t0) - rest)
    _say(f"[2/5] training preset {cfg.preset!r} on blocks {cfg.draft_block} and {cfg.seq_len} for {limit / 60:.1f} min")
    run_dir = out / "run"
    tcfg = TrainConfig(
        data=str(out / "data"), out=str(run_dir), preset=cfg.preset,
        block_sizes=[cfg.draft_block, "L"], block_weights=[1 - cfg.global_weight, cfg.global_weight],
        steps=1_000_000, batch_size=cfg.batch_size, lr=cfg.lr, warmup=100, ema=0.999,
        eval_every=100, eval_batches=4, save_every=100, keep_last=1, log_every=20, seed=cfg.seed,
        time_limit=limit, mixed_precision=None, progress=True,
    )
    if (run_dir / "checkpoints").is_dir():
        tcfg.resume = True  # a re-run continues the same model for another budget
    trained = train(tcfg)
    stage("train", t)

    ckpt = resolve_checkpoint(run_dir, which="best")
    model, _ = load_model(ckpt, device=device)
    tok = load_tokenizer(model.config.tokenizer)

    # 3. draft
    t = time.perf_counter()
    _say(f"[3/5] drafting {cfg.samples} samples of {cfg.seq_len} tokens (block {cfg.draft_block}, first-hitting)")
    dcfg = DraftConfig(n=cfg.samples, length=cfg.seq_len, block_size=cfg.draft_block, batch_size=32, seed=cfg.seed)
    drafts = _save(out / "draft.jsonl", draft(model, dcfg, tokenizer=tok, model_path=str(ckpt)))
    stage("draft", t)

    # a control for entropy: refinement tends to lower entropy, and lower entropy alone lowers
    # gen PPL, so drafts at a lower nucleus mass give the draft's PPL-entropy trade-off
    t = time.perf_counter()
    ccfg = dataclasses.replace(dcfg, top_p=cfg.control_top_p)
    control = _save(out / f"draft_top_p{cfg.control_top_p}.jsonl", draft(model, ccfg, tokenizer=tok, model_path=str(ckpt)))
    stage("control draft", t)

    # 4. refine
    t = time.perf_counter()
    _say(f"[4/5] global refinement of the {cfg.ratio:.0%} least confident tokens")
    rcfg = RefineConfig(stages=[(None, cfg.ratio)], confidence="snapshot", batch_size=32, seed=cfg.seed)
    refined = _save(out / "refined.jsonl", refine(model, drafts, rcfg, tokenizer=tok, model_path=str(ckpt)))
    stage("refine", t)

    # 5. score
    t = time.perf_counter()
    _say("[5/5] scoring with an autoregressive model")
    scorer = pick_scorer(cfg.scorer, device)
    _say(f"scorer: {scorer.name}")
    res = {"draft": evaluate.gen_ppl(drafts, scorer), "refined": evaluate.gen_ppl(refined, scorer),
           "control": evaluate.gen_ppl(control, scorer)}
    stage("score", t)

    train_rows = data.rows("train")
    d, r = res["draft"]["summary"], res["refined"]["summary"]
    rel_ppl = (r["mean_ppl"] - d["mean_ppl"]) / d["mean_ppl"] if d["mean_ppl"] else None
    rel_ent = (r["mean_entropy"] - d["mean_entropy"]) / d["mean_entropy"] if d["mean_entropy"] else None
    c = res["control"]["summary"]
    matched = draft_ppl_at_entropy((d["mean_entropy"], d["mean_ppl"]), (c["mean_entropy"], c["mean_ppl"]), r["mean_entropy"])
    results = {
        "scorer": scorer.name,
        "draft": {**d, "copy_rate_8gram": ngram_copy_rate([x["tokens"] for x in drafts], train_rows)},
        "refined": {**r, "copy_rate_8gram": ngram_copy_rate([x["tokens"] for x in refined], train_rows)},
        "draft_mean_gen_ppl": d["mean_ppl"],
        "refined_mean_gen_ppl": r["mean_ppl"],
        "draft_mean_entropy": d["mean_entropy"],
        "refined_mean_entropy": r["mean_entropy"],
        "relative_change_gen_ppl": rel_ppl,
        "relative_change_entropy": rel_ent,
        "control_draft": {**c, "top_p": cfg.control_top_p},
        "draft_mean_gen_ppl_at_refined_entropy": matched,
        # better than the draft at (about) the same entropy: either the entropy barely moved,
        # or the drafts' own PPL-entropy line, read at the refined entropy, is worse
        "refinement_helps": bool(rel_ppl is not None and rel_ppl < 0 and rel_ent is not None
                                 and (abs(rel_ent) <= 0.03 or (matched is not None and r["mean_ppl"] < matched))),
        # the stricter test: better than drafts sampled more conservatively to the same entropy
        "refinement_beats_entropy_control": None if matched is None else bool(r["mean_ppl"] < matched),
        "per_sample": {"draft": res["draft"]["samples"], "refined": res["refined"]["samples"]},
        "training": {k: v for k, v in trained.items() if isinstance(v, (int, float, str, list, dict)) or v is None},
        "checkpoint": str(ckpt),
        "config": dataclasses.asdict(cfg),
        "device": device,
        "torch": torch.__version__,
        "timings_s": timings,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    report.write_report(out, results, run_dir, drafts, refined)
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2) + "\n")
    _say(f"draft gen PPL {d['mean_ppl']:.2f} (entropy {d['mean_entropy']:.3f}) -> refined {r['mean_ppl']:.2f} "
         f"(entropy {r['mean_entropy']:.3f}); report: {out / 'report.md'}")
    return results


def _save(path: Path, records: Any) -> list[dict]:
    """Write records to `path` as they come (a crash keeps the finished ones) and return them."""
    from did_cli.records import RecordWriter

    kept = []
    with RecordWriter(path) as w:
        for rec in records:
            w.write(rec)
            kept.append(rec)
    return kept


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
