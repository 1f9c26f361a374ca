"""What the quickstart's samples show: the comparison of drafts and refined samples under the
verdict rule of `did eval-ppl` (did_cli/evaluation/verdict.py), the 8-gram copy rate, and
whether the model trained enough for any of it to mean something."""

from __future__ import annotations

import math
from typing import Any


def ngram_copy_rate(
    samples: list[list[int]], train_rows: Any, n: int = 8, max_train_tokens: int = 20_000_000
) -> float | None:
    """Share of the samples' n-grams that also occur in the training split (memorisation check:
    a model that copies its training data gets a flattering gen PPL)."""
    import numpy as np

    def hashes(arr: np.ndarray) -> np.ndarray:
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


MIN_STEPS = 250
"""Fewer training steps than this (half the getting-started recipe's 500) and the quickstart
draws no conclusion from its samples."""
NEAR_UNIFORM = 1.0
"""A validation NELBO within this many nats of ln V (a uniform guess over the vocabulary) means
the model has not learned much beyond chance: no conclusion either."""
TARGET_STEPS = 500


def training_check(training: dict, vocab_size: int, batch_tokens: int, total_s: float) -> dict:
    """Whether the sampled model trained enough for its samples to mean something: `trained`,
    one-line `reasons` when not, and `suggested_minutes`, a --minutes budget that gives
    TARGET_STEPS steps at the measured training rate (`batch_tokens` data tokens a step)."""
    best = training.get("best") or {}
    steps = int(training.get("step") or 0)
    nelbo = best.get("val_nelbo", training.get("val_nelbo"))
    uniform = math.log(vocab_size)
    reasons = []
    if steps < MIN_STEPS:
        reasons.append(f"it trained {steps} steps, fewer than {MIN_STEPS}")
    if nelbo is None:
        reasons.append("it has no validation NELBO")
    elif nelbo > uniform - NEAR_UNIFORM:
        reasons.append(
            f"its validation NELBO {nelbo:.2f} is within {NEAR_UNIFORM:g} nat of the uniform ln V = "
            f"{uniform:.2f} (the model is close to random)"
        )
    rate = (training.get("tokens_per_s") or 0.0) / batch_tokens  # steps per second of training proper
    suggested = None
    if reasons and rate > 0:
        suggested = math.ceil((total_s + max(0, TARGET_STEPS - steps) / rate) / 60.0)
    return {
        "trained": not reasons,
        "reasons": reasons,
        "steps": steps,
        "val_nelbo": nelbo,
        "uniform_nelbo": uniform,
        "target_steps": TARGET_STEPS,
        "suggested_minutes": suggested,
    }


def results(cfg: Any, res: dict, data: Any, drafts: list, refined: list, scorer: str) -> dict:
    """The comparison of drafts and refined samples, read against the entropy control, with
    paired bootstrap intervals; the verdict is `did_cli.evaluation.verdict`'s, as in eval-ppl."""
    from did_cli.evaluation import bootstrap as bs
    from did_cli.evaluation import verdict as vd

    train_rows = data.rows("train")
    d, r, c = res["draft"]["summary"], res["refined"]["summary"], res["control"]["summary"]
    rel_ppl = (r["mean_ppl"] - d["mean_ppl"]) / d["mean_ppl"] if d["mean_ppl"] else None
    rel_ent = (r["mean_entropy"] - d["mean_entropy"]) / d["mean_entropy"] if d["mean_entropy"] else None
    matched = vd.ppl_at_entropy(
        (d["mean_entropy"], d["mean_ppl"]), (c["mean_entropy"], c["mean_ppl"]), r["mean_entropy"]
    )
    cmp = vd.compare_sets(res["draft"]["samples"], res["refined"]["samples"], res["control"]["samples"])
    vs_control = bs.verdict(cmp["gap_vs_control"])
    return {
        "scorer": scorer,
        "draft": {**d, "copy_rate_8gram": ngram_copy_rate([x["tokens"] for x in drafts], train_rows)},
        "refined": {**r, "copy_rate_8gram": ngram_copy_rate([x["tokens"] for x in refined], train_rows)},
        "draft_mean_gen_ppl": d["mean_ppl"],
        "refined_mean_gen_ppl": r["mean_ppl"],
        "draft_mean_entropy": d["mean_entropy"],
        "refined_mean_entropy": r["mean_entropy"],
        "relative_change_gen_ppl": rel_ppl,
        "relative_change_entropy": rel_ent,
        "relative_change_gen_ppl_ci": cmp["rel_ppl"],
        "relative_change_entropy_ci": cmp["rel_entropy"],
        "gap_vs_entropy_control_ci": cmp["gap_vs_control"],
        "control_draft": {**c, "top_p": cfg.control_top_p},
        "draft_mean_gen_ppl_at_refined_entropy": matched,
        # each interval read alone; the verdict below combines them
        "refinement_vs_draft": bs.verdict(cmp["rel_ppl"]),
        "refinement_vs_entropy_control": vs_control,
        "entropy_tolerance": vd.ENTROPY_TOLERANCE,
        "verdict": cmp["verdict"],
        "verdict_reason": cmp["reason"],
        "refinement_helps": cmp["verdict"] == "beats",
        # the stricter test: better than drafts sampled more conservatively to the same entropy
        "refinement_beats_entropy_control": None if matched is None else vs_control == "beats",
        "per_sample": {"draft": res["draft"]["samples"], "refined": res["refined"]["samples"]},
    }


def judge_training(results: dict, vocab_size: int, batch_tokens: int, say: Any) -> None:
    """No verdict from a model that did not train: the flag, the reasons and a budget."""
    check = training_check(results["training"], vocab_size, batch_tokens, results["total_s"])
    results["model_trained"] = check["trained"]
    results["training_check"] = check
    if not check["trained"]:
        budget = (
            f"--minutes {check['suggested_minutes']}" if check["suggested_minutes"] else "a larger --minutes"
        )
        results.update(
            verdict="untrained",
            verdict_reason=f"no conclusions: the model did not train ({'; '.join(check['reasons'])}); "
            f"give it {budget}",
            refinement_helps=False,
        )
        say(f"NO CONCLUSIONS: the model did not train ({'; '.join(check['reasons'])}); give it {budget}")
