"""How sure a comparison of two sample sets is: paired bootstrap intervals.

Two sets of samples with the same ids (a draft file and its refinement, or two settings drawn
from the same seeds) are paired: sample i of one and sample i of the other share their
generator or their draft, so their difference is much less noisy than either figure. The
bootstrap resamples the ids with replacement, recomputes the statistic on each resample, and
reports the central 95% of its values (percentile interval, seeded, so reports are
reproducible). `verdict` reads an interval of a relative change in gen PPL: lower is better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
SEED = 0


def paired(a: Sequence[dict], b: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-sample values `key` of the samples the two lists share by id, in a's order; None
    when the ids differ (not paired) or a shared sample lacks the value."""
    ia = {s["id"]: s.get(key) for s in a}
    ib = {s["id"]: s.get(key) for s in b}
    if len(ia) != len(a) or set(ia) != set(ib) or len(ia) < 2:
        return None
    xa = [ia[k] for k in ia]
    xb = [ib[k] for k in ia]
    if any(v is None for v in xa + xb):
        return None
    return np.asarray(xa, dtype=np.float64), np.asarray(xb, dtype=np.float64)


def bootstrap(
    stat: Callable[[np.ndarray], float], n: int, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED
) -> tuple[float, float, float]:
    """(statistic on all n items, lower, upper) of the percentile interval of `stat(idx)` over
    resamples idx of range(n) with replacement."""
    rng = np.random.default_rng(seed)
    est = float(stat(np.arange(n)))
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return est, float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return est, float(lo), float(hi)


def relative_change(a: np.ndarray, b: np.ndarray, **kw) -> dict:
    """Paired bootstrap of mean(b) / mean(a) - 1: {"estimate", "lo", "hi", "level", "n"}."""
    est, lo, hi = bootstrap(lambda i: b[i].mean() / a[i].mean() - 1.0, len(a), **kw)
    return {"estimate": est, "lo": lo, "hi": hi, "level": kw.get("level", LEVEL), "n": len(a)}


def verdict(ci: dict | None) -> str | None:
    """'beats' (the whole interval of a relative PPL change is below 0), 'worse' (above 0) or
    'level' (it holds 0); None without an interval."""
    if not ci or not np.isfinite(ci.get("lo", np.nan)) or not np.isfinite(ci.get("hi", np.nan)):
        return None
    if ci["hi"] < 0:
        return "beats"
    if ci["lo"] > 0:
        return "worse"
    return "level"


def within(ci: dict | None, band: float) -> bool:
    """Whether the whole interval lies inside [-band, band]."""
    return bool(ci) and np.isfinite(ci["lo"]) and -band <= ci["lo"] and ci["hi"] <= band
