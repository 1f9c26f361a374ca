"""The one rule that says whether a sample set beats another (`did eval-ppl A B`, the quickstart).

Lower entropy (more repetitive text) lowers gen PPL on its own, so a lower gen PPL is a gain
only where the entropy did not fall with it. A candidate **beats** its reference when the paired
95% interval of the relative change of mean gen PPL lies wholly below 0 and either

- the interval of the relative change of mean entropy does not reach below `-tolerance`
  (`ENTROPY_TOLERANCE`, 3%: "about the same entropy"), or
- an entropy control was given (the reference's model sampled with a lower nucleus) and the
  candidate also beats the reference's gen PPL read at the candidate's entropy off the line
  through the reference and the control (the whole interval of that gap below 0).

Otherwise the verdict says what happened: `level` (the PPL interval holds 0), `worse` (it lies
above 0) or `lower-entropy` (lower PPL at an entropy that fell by more than the tolerance: not a
gain until it is compared at matched entropy).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from did_cli.evaluation import bootstrap as bs

ENTROPY_TOLERANCE = 0.03
"""The largest fall of mean entropy (relative; the lower end of its 95% interval) that still
counts as the same entropy."""

VERDICTS = ("beats", "level", "worse", "lower-entropy")


def entropy_held(entropy_ci: dict | None, tolerance: float = ENTROPY_TOLERANCE) -> bool:
    """Whether the whole interval of the relative entropy change lies at or above `-tolerance`."""
    lo = (entropy_ci or {}).get("lo")
    return lo is not None and math.isfinite(lo) and lo >= -tolerance


def judge(
    ppl_ci: dict | None,
    entropy_ci: dict | None,
    control_ci: dict | None = None,
    tolerance: float = ENTROPY_TOLERANCE,
    has_control: bool = False,
) -> dict[str, Any]:
    """The verdict of a candidate against its reference: {"verdict": one of VERDICTS or None
    (no interval: unpaired), "reason": one sentence}.

    `ppl_ci` and `entropy_ci` are paired intervals ({"lo", "hi"}) of the relative changes of mean
    gen PPL and mean entropy; `control_ci` the interval of the candidate's gap to the reference
    read at the candidate's entropy (None when there is no control, or it could not be read);
    `has_control` says a control was given, so its absence is worth a word.
    """
    by_ppl = bs.verdict(ppl_ci)
    if by_ppl is None:
        return {"verdict": None, "reason": "not paired with the reference (other sample ids): no interval"}
    if by_ppl == "level":
        return {"verdict": "level", "reason": "the interval of the gen PPL change holds 0"}
    if by_ppl == "worse":
        return {"verdict": "worse", "reason": "higher gen PPL (the whole interval above 0)"}
    if entropy_held(entropy_ci, tolerance):
        return {
            "verdict": "beats",
            "reason": f"lower gen PPL (the whole interval below 0) at an entropy that fell by at most "
            f"{tolerance:.0%}",
        }
    fell = _fell(entropy_ci, tolerance)
    by_control = bs.verdict(control_ci)
    if by_control == "beats":
        return {
            "verdict": "beats",
            "reason": f"lower gen PPL at lower entropy ({fell}), and lower than the entropy control "
            "at the same entropy",
        }
    if by_control is not None:
        what = "level with" if by_control == "level" else "worse than"
        return {
            "verdict": "lower-entropy",
            "reason": f"lower gen PPL at lower entropy ({fell}), {what} the entropy control at the same "
            "entropy: sampling the reference with a lower nucleus does as well",
        }
    hint = (
        "the control could not be read at this entropy (control and reference have the same entropy)"
        if has_control
        else "compare with drafts at a lower nucleus (did draft --top-p 0.8, same -n and --seed) "
        "passed as --control"
    )
    return {"verdict": "lower-entropy", "reason": f"lower gen PPL at lower entropy ({fell}): {hint}"}


def _fell(entropy_ci: dict | None, tolerance: float) -> str:
    if not entropy_ci or entropy_ci.get("estimate") is None:
        return f"entropy unknown, the tolerance is {tolerance:.0%}"
    return (
        f"entropy {entropy_ci['estimate'] * 100:+.1f}%, interval down to {entropy_ci['lo'] * 100:+.1f}%, "
        f"beyond the {tolerance:.0%} tolerance"
    )


def ppl_at_entropy(a: tuple[float, float], b: tuple[float, float], entropy: float) -> float | None:
    """Mean gen PPL a setting would have at `entropy`, read off the line through two of its
    sampling settings (entropy, PPL) in log-PPL (linear inside or near their range; None if the
    two have the same entropy)."""
    (e1, p1), (e2, p2) = a, b
    if None in (e1, p1, e2, p2, entropy) or abs(e1 - e2) < 1e-6 or p1 <= 0 or p2 <= 0:
        return None
    w = (entropy - e1) / (e2 - e1)
    return math.exp(math.log(p1) + w * (math.log(p2) - math.log(p1)))


def intervals(reference: list[dict], candidate: list[dict], control: list[dict] | None = None) -> dict:
    """Paired bootstrap intervals of a comparison (per-sample `gen_ppl` figures, paired by id):
    `rel_ppl` and `rel_entropy`, the relative changes of mean gen PPL and entropy from reference
    to candidate; with a control (the reference's model at a lower nucleus, same ids),
    `gap_vs_control`: the candidate's mean PPL against the reference's read at the candidate's
    entropy (`ppl_at_entropy`), the line re-read on every resample. Each is None where the sets
    are not paired."""
    out: dict[str, Any] = {"rel_ppl": None, "rel_entropy": None, "gap_vs_control": None}
    pp, pe = bs.paired(reference, candidate, "ppl"), bs.paired(reference, candidate, "entropy")
    if pp:
        out["rel_ppl"] = bs.relative_change(*pp)
    if pe:
        out["rel_entropy"] = bs.relative_change(*pe)
    if control is None or not (pp and pe):
        return out
    cp, ce = bs.paired(reference, control, "ppl"), bs.paired(reference, control, "entropy")
    if not (cp and ce):
        return out
    (dp, rp), (de, re_), cpv, cev = pp, pe, cp[1], ce[1]

    def gap(i: np.ndarray) -> float:
        m = ppl_at_entropy((de[i].mean(), dp[i].mean()), (cev[i].mean(), cpv[i].mean()), re_[i].mean())
        return float("nan") if m is None else rp[i].mean() / m - 1.0

    est, lo, hi = bs.bootstrap(gap, len(dp))
    if math.isfinite(est):
        out["gap_vs_control"] = {"estimate": est, "lo": lo, "hi": hi, "level": bs.LEVEL, "n": len(dp)}
    return out


def compare_sets(
    reference: list[dict],
    candidate: list[dict],
    control: list[dict] | None = None,
    tolerance: float = ENTROPY_TOLERANCE,
) -> dict:
    """`intervals` of a candidate against its reference plus `judge`'s verdict and reason."""
    ci = intervals(reference, candidate, control)
    return {
        **ci,
        **judge(ci["rel_ppl"], ci["rel_entropy"], ci["gap_vs_control"], tolerance, control is not None),
    }
