"""`did show`: one self-contained HTML page of drafts, their refinements and their confidences.

    page = render_page(drafts, refined, scores=eval_json, limit=50)
    write_page(page, "view.html")

Drafts and refined records are paired by `id` (`did refine` keeps it); a refined record alone
still holds its draft (`draft_tokens`). The page has no scripts and loads nothing: inline CSS
only, and a Content-Security-Policy that forbids scripts and every outside resource, so a text
from an untrusted record can only ever be shown, never run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from did_cli.errors import DidError
from did_cli.evaluation.gen_ppl import sample_tokens
from did_cli.io.outputs import target, write_bytes, write_stdout
from did_cli.pipeline.page_html import Pieces, column, css, esc, legend
from did_cli.util import finite, fmt, unigram_entropy

DOT = " \u00b7 "
OUTCOMES = ("remasked", "changed", "nfe", "seconds")  # per-stage results, not settings


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


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _mean_conf(rec: dict | None) -> float | None:
    isfinite = math.isfinite
    return _mean([c for c in (rec or {}).get("confidence") or [] if c is not None and isfinite(c)])


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


def _settings(s: Sample) -> dict[str, str]:
    """Flat (label -> value) settings of a sample: drafting, model, each refine stage."""
    out: dict[str, str] = {}
    src = s.draft or s.refined or {}
    for key in ("draft", "model"):
        for k, v in (src.get(key) or {}).items():
            out[f"{key}.{k}"] = v if isinstance(v, str) else json.dumps(v)
    for n, st in enumerate((s.refined or {}).get("stages") or [], 1):
        for k, v in st.items() if isinstance(st, dict) else []:
            if k not in OUTCOMES:
                out[f"stage {n}.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def _dl(items: dict[str, str]) -> str:
    return "".join(f"<span class=kv><b>{esc(k)}</b> {esc(v)}</span> " for k, v in items.items())


def _summary(samples: list[Sample], shown: int, notes: list[str]) -> str:
    has_r = any(s.refined for s in samples)
    rows = [
        (
            "mean confidence",
            [_mean(_mean_conf(s.draft) for s in samples), _mean(_mean_conf(s.refined) for s in samples)],
            3,
        ),
        (
            "mean entropy (nats)",
            [
                _mean(s.entropy("draft") for s in samples),
                _mean(s.entropy("refined") for s in samples if s.refined),
            ],
            3,
        ),
    ]
    ppl = [[s.ppl[side] for s in samples if side in s.ppl] for side in ("draft", "refined")]
    if ppl[0] or ppl[1]:
        rows.append(("mean gen PPL", [_mean(p) for p in ppl], 2))
    head = "<tr><th></th><th>draft</th>" + ("<th>refined</th>" if has_r else "") + "</tr>"
    body = "".join(
        f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{fmt(v, d)}</td>" for v in vals[: 1 + has_r]) + "</tr>"
        for label, vals, d in rows
    )
    if ppl[0] or ppl[1]:
        body += (
            "<tr><th>samples with gen PPL</th>"
            + "".join(f"<td>{len(p)}</td>" for p in ppl[: 1 + has_r])
            + "</tr>"
        )
    gen = sum(max(0, len(s.draft_tokens or []) - 1) for s in samples)
    rem = sum(len(s.remasked) for s in samples)
    chg = sum(len(s.changed) for s in samples)
    left = len(samples) - shown
    lines = [
        f"{len(samples)} samples"
        + (f"; the first {shown} are shown, {left} left out (--limit)" if left else ", all shown")
    ]
    if has_r:
        pct = lambda k: f" ({100 * k / gen:.1f}% of {gen} generated)" if gen else ""  # noqa: E731
        lines.append(f"re-masked tokens: {rem}{pct(rem)}; changed tokens: {chg}{pct(chg)}")
    lines += notes
    items = "".join(f"<p>{esc(x)}</p>" for x in lines)
    return (
        f"<section class=summary><h2>Summary</h2>{items}<table>{head}{body}</table>"
        "<p class=note>Figures cover every sample in the input, shown or not.</p></section>"
    )


def _stages_table(rec: dict) -> str:
    stages = [st for st in rec.get("stages") or [] if isinstance(st, dict)]
    if not stages:
        return ""
    head = (
        "<tr><th>stage</th><th>block</th><th>ratio</th><th>re-masked</th><th>changed</th>"
        "<th>NFE</th><th>seconds</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{k}</td><td>{esc(st.get('block_size', '-'))}</td><td>{esc(st.get('ratio', '-'))}</td>"
        f"<td>{len(st.get('remasked') or [])}</td><td>{esc(st.get('changed', '-'))}</td>"
        f"<td>{esc(st.get('nfe', '-'))}</td><td>{fmt(finite(st.get('seconds')), 2)}</td></tr>"
        for k, st in enumerate(stages, 1)
    )
    return f"<table class=stages>{head}{rows}</table>"


def _cost(rec: dict | None) -> str:
    if not rec:
        return "-"
    sec = finite(rec.get("seconds"))
    return f"{rec.get('nfe', '-')} NFE, {'-' if sec is None else f'{sec:.2f}'} s"  # escaped by the caller


def _text_differs(rec: dict, tok: Any, mask_id: int | None) -> bool:
    toks = rec["tokens"]
    body = toks[1:] if toks[:1] == [tok.bos_id] else toks
    return isinstance(rec.get("text"), str) and rec["text"] != tok.decode([t for t in body if t != mask_id])


def _sample(k: int, s: Sample, pieces: Pieces, common: dict[str, str]) -> str:
    base = s.refined or s.draft
    model = base.get("model") or {}
    mask_id = model.get("mask_id", pieces.tok.mask_id)
    remasked, changed = s.remasked, s.changed

    def col(rec: dict | None, tokens, conf, other: dict[int, int | None], marks) -> str:
        n = len(tokens)
        plen = (rec or base).get("prompt_len", 1) or 0
        slen = (rec or base).get("suffix_len") or 0
        fixed = set(range(min(plen, n))) | set(range(max(0, n - slen), n))
        start = 1 if tokens and tokens[0] == pieces.tok.bos_id else 0
        return column(
            pieces,
            tokens,
            conf,
            body_start=start,
            fixed=fixed,
            mask_id=mask_id,
            remasked=marks,
            changed=other,
        )

    cols = []
    if s.draft_tokens is not None:
        conf = s.draft.get("confidence") if s.draft else None
        cols.append(
            ("draft", col(s.draft, s.draft_tokens, conf, {p: r for p, (_, r) in changed.items()}, remasked))
        )
    if s.refined is not None:
        r = s.refined
        cols.append(
            (
                "refined",
                col(r, r["tokens"], r.get("confidence"), {p: d for p, (d, _) in changed.items()}, remasked),
            )
        )
    figs = [f"{len(base['tokens'])} tokens"]
    ent = [fmt(s.entropy(side), 3) for side, _ in cols]
    figs.append("entropy " + " \u2192 ".join(ent) + " nats")
    if s.ppl:
        figs.append("gen PPL " + " \u2192 ".join(fmt(s.ppl.get(side), 2) for side, _ in cols))
    if s.refined is not None:
        stages = [st for st in s.refined.get("stages") or [] if isinstance(st, dict)]
        total = sum(len(st.get("remasked") or []) for st in stages)
        figs.append(
            f"re-masked {len(remasked)}"
            + (f" ({total} over {len(stages)} stages)" if total != len(remasked) else "")
        )
        figs.append(f"changed {len(changed)}")
    cost = [f"draft {_cost(s.draft)}"] if s.draft else []
    cost += [f"refined (total) {_cost(s.refined)}"] if s.refined else []
    figs.append("; ".join(cost))
    own = {key: v for key, v in _settings(s).items() if common.get(key) != v}
    notes = list(s.notes)
    for side, rec in (("draft", s.draft), ("refined", s.refined)):
        if rec is not None and _text_differs(rec, pieces.tok, mask_id):
            notes.append(f"the {side} record's text differs from its decoded tokens (the tokens are shown)")
    head = "".join(
        f"<div class=col><h3>{side}</h3><div class=tokens>{html}</div></div>" for side, html in cols
    )
    return (
        f'<section class=sample id="s{k}"><h2>{esc(s.id)}</h2>'
        f"<p class=figs>{esc(DOT.join(figs))}</p>"
        + "".join(f"<p class=warn>{esc(x)}</p>" for x in notes)
        + (f"<p class=own>settings of this sample: {_dl(own)}</p>" if own else "")
        + f"<div class=cols>{head}</div>{_stages_table(s.refined or {})}</section>"
    )


CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_page(
    drafts: Sequence[dict] | None,
    refined: Sequence[dict] | None = None,
    scores: dict | None = None,
    tokenizer: Any = None,
    limit: int | None = 50,
    names: dict[str, str | None] | None = None,
) -> str:
    """The HTML page (a str) of `drafts` and their `refined` records.

    A single list whose records carry `draft_tokens` is shown as refined records. `scores` is
    the parsed JSON of `did eval-ppl --json`; `names` ({"draft": path, "refined": path}) helps
    match its inputs to the files. `limit` caps the samples shown (None or 0: all); the summary
    covers them all. `tokenizer` defaults to the bundled GPT-2.
    """
    if refined is None and drafts and all("draft_tokens" in r for r in drafts):
        drafts, refined = None, drafts
        names = {"draft": None, "refined": (names or {}).get("draft")}
    if tokenizer is None:
        from did_cli.io.tokenizer import load_tokenizer

        tokenizer = load_tokenizer("gpt2")
    _check_tokenizer(tokenizer, [*(drafts or []), *(refined or [])])
    samples = pair(drafts, refined)
    if not samples:
        raise DidError("no samples to show")
    notes = apply_scores(samples, scores, names or {})
    shown = samples[:limit] if limit else samples
    flat = [_settings(s) for s in shown]
    common = {k: v for k, v in flat[0].items() if all(f.get(k) == v for f in flat[1:])}
    pieces = Pieces(tokenizer)
    body = "".join(_sample(k, s, pieces, common) for k, s in enumerate(shown))
    settings = (
        f"<section><h2>Settings shared by the shown samples</h2><p>{_dl(common) or 'none'}</p></section>"
    )
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>did show: {len(samples)} samples</title><style>{css()}</style></head><body>"
        f"<h1>did show: {len(samples)} samples</h1>"
        + _summary(samples, len(shown), notes)
        + legend(refined is not None)
        + settings
        + body
        + "</body></html>\n"
    )


def _check_tokenizer(tok: Any, records: list[dict]) -> None:
    """Refuse records whose model names another tokenizer (their ids would decode to nonsense)."""
    mine = getattr(tok, "fingerprint", None)
    for rec in records:
        fp = (rec.get("model") or {}).get("fingerprint")
        if mine and isinstance(fp, str) and fp != mine:
            raise DidError(
                f"record {rec['id']!r} was made with another tokenizer (fingerprint {fp}, "
                f"{getattr(tok, 'name', 'this one')} has {mine}); pass --tokenizer"
            )


def check_target(path: str) -> None:
    """Fail before any work when `path` cannot be written ('-' is stdout)."""
    if path == "-":
        return
    target(path)


def write_page(page: str, path: str) -> None:
    """Write the page to `path` ('-' = stdout) as did_cli.io.outputs does: a regular file is
    replaced atomically (temp file in the same folder, then rename), a symlink is followed, and
    a device or pipe (/dev/stdout, a FIFO) is written straight through."""
    data = page.encode("utf-8", "replace")  # a lone surrogate from a record must not abort the write
    if path == "-":
        write_stdout(data)
        return
    write_bytes(path, data)
