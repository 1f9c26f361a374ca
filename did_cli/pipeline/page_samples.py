"""The samples of a `did show` page: drafts paired with their refinements by id, and the gen
PPL of each side from the records or from `did eval-ppl --json`."""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from did_cli.errors import DidError
from did_cli.evaluation.gen_ppl import sample_tokens
from did_cli.util import finite, unigram_entropy


@dataclass
class Sample:
    """One sample: its draft record and/or its refined record, and what the page shows of it."""

    id: str
    draft: dict | None = None
    refined: dict | None = None
    notes: list[str] = field(default_factory=list)
    ppl: dict[str, float] = field(default_factory=dict)  # side -> gen PPL
    _entropy: dict[str, float | None] = field(default_factory=dict, repr=False)

    @property
    def draft_tokens(self) -> list[int] | None:
        if self.draft is not None:
            return self.draft["tokens"]
        return self.refined.get("draft_tokens") if self.refined else None

    def entropy(self, side: str) -> float | None:
        if side not in self._entropy:
            self._entropy[side] = self._unigram_entropy(side)
        return self._entropy[side]

    def _unigram_entropy(self, side: str) -> float | None:
        rec = self.refined if side == "refined" else self.draft or self.refined
        toks = self.refined.get("tokens") if side == "refined" and self.refined else self.draft_tokens
        if toks is None:
            return None
        return unigram_entropy(sample_tokens({"tokens": toks, "model": (rec or {}).get("model")}))

    @functools.cached_property
    def remasked(self) -> dict[int, list[int]]:
        """Position -> the (1-based) refine stages that re-masked it."""
        out: dict[int, list[int]] = {}
        for k, st in enumerate((self.refined or {}).get("stages") or [], 1):
            for p in (st.get("remasked") or []) if isinstance(st, dict) else []:
                if isinstance(p, int):
                    out.setdefault(p, []).append(k)
        return out

    @functools.cached_property
    def changed(self) -> dict[int, tuple[int | None, int | None]]:
        """Position -> (draft token, refined token) where the two differ."""
        d, r = self.draft_tokens, (self.refined or {}).get("tokens")
        if d is None or r is None:
            return {}
        pad = lambda t, p: t[p] if p < len(t) else None  # noqa: E731
        return {p: (pad(d, p), pad(r, p)) for p in range(max(len(d), len(r))) if pad(d, p) != pad(r, p)}


def pair(drafts: Sequence[dict] | None, refined: Sequence[dict] | None) -> list[Sample]:
    """Samples in the order of the first file; refined records are matched to drafts by id and
    the ones without a draft record follow."""
    samples: list[Sample] = []
    waiting: dict[str, list[Sample]] = {}
    for rec in drafts or []:
        s = Sample(id=rec["id"], draft=rec)
        samples.append(s)
        waiting.setdefault(s.id, []).append(s)
    for rec in refined or []:
        match = waiting.get(rec["id"])
        if match:
            s = match.pop(0)
            s.refined = rec
            dt = rec.get("draft_tokens")
            if dt is not None and dt != s.draft["tokens"]:
                s.notes.append("the draft file's tokens differ from this refined record's draft_tokens")
        else:
            samples.append(Sample(id=rec["id"], refined=rec))
    return samples


def mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def mean_conf(rec: dict | None) -> float | None:
    isfinite = math.isfinite
    return mean([c for c in (rec or {}).get("confidence") or [] if c is not None and isfinite(c)])


def apply_scores(samples: list[Sample], scores: dict | None, names: dict[str, str | None]) -> list[str]:
    """Attach gen PPL to the samples: a record's own `gen_ppl`, overridden by `scores` (the JSON
    of `did eval-ppl --json`), matched by id. Each eval input goes to the draft or the refined
    side by its file name, else by which side's per-sample entropies it reproduces (both sides
    share ids), else by its place (first input: drafts). Returns notes on inputs that fit
    neither."""
    for s in samples:
        for side in ("draft", "refined"):
            v = finite((getattr(s, side) or {}).get("gen_ppl"))
            if v is not None:
                s.ppl[side] = v
    if scores is None:
        return []
    inputs = scores.get("inputs") if isinstance(scores, dict) else None
    if not isinstance(inputs, dict):
        raise DidError("scores: not the JSON that `did eval-ppl --json` writes (no 'inputs' object)")
    by_id: dict[str, list[Sample]] = {}
    for s in samples:
        by_id.setdefault(s.id, []).append(s)
    notes = []
    for k, (name, res) in enumerate(inputs.items()):
        rows = res.get("samples") if isinstance(res, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DidError(f"scores: input {name!r} has no 'samples' list")
        sides = _sides(name, rows, names, by_id)
        if len(sides) > 1:  # equal entropies on both sides: fall back on the order of the inputs
            sides = [("draft", "refined")[k]] if k < 2 else []
        if not sides:
            notes.append(f"scores of {name} match neither shown file (by name or by entropy); not used")
        for row in rows:
            v = finite(row.get("ppl"))
            for s in by_id.get(str(row.get("id")), []) if v is not None else []:
                for side in sides:
                    s.ppl[side] = v
    return notes


def _sides(
    name: str, rows: list[dict], names: dict[str, str | None], by_id: dict[str, list[Sample]]
) -> list[str]:
    paths = {side: p for side, p in names.items() if p}
    for how in (lambda p: os.path.abspath(p), lambda p: os.path.basename(p)):
        hits = [side for side, p in paths.items() if how(p) == how(name)]
        if len(hits) == 1:
            return hits
    count = {"draft": 0, "refined": 0}
    for row in rows:
        e = finite(row.get("entropy"))
        for s in by_id.get(str(row.get("id")), []) if e is not None else []:
            for side in count:
                mine = s.entropy(side) if (side == "draft" or s.refined) else None
                count[side] += mine is not None and abs(mine - e) < 1e-9
    best = max(count.values())
    return [side for side, c in count.items() if c == best] if best else []
