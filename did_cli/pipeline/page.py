"""`did show`: one self-contained HTML page of drafts, their refinements and their confidences.

    page = render_page(drafts, refined, scores=eval_json, limit=50)
    write_page(page, "view.html")

Drafts and refined records are paired by `id` (`did refine` keeps it); a refined record alone
still holds its draft (`draft_tokens`). The page has no scripts and loads nothing: inline CSS
only, and a Content-Security-Policy that forbids scripts and every outside resource, so a text
from an untrusted record can only ever be shown, never run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from did_cli.errors import DidError
from did_cli.io.outputs import check_output, write_bytes, write_stdout
from did_cli.pipeline.page_html import Pieces, column, css, esc, legend
from did_cli.pipeline.page_samples import Sample, apply_scores, mean, mean_conf, pair
from did_cli.util import finite, fmt

DOT = " \u00b7 "
OUTCOMES = ("remasked", "changed", "nfe", "seconds")  # per-stage results, not settings


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
            [mean(mean_conf(s.draft) for s in samples), mean(mean_conf(s.refined) for s in samples)],
            3,
        ),
        (
            "mean entropy (nats)",
            [
                mean(s.entropy("draft") for s in samples),
                mean(s.entropy("refined") for s in samples if s.refined),
            ],
            3,
        ),
    ]
    ppl = [[s.ppl[side] for s in samples if side in s.ppl] for side in ("draft", "refined")]
    if ppl[0] or ppl[1]:
        rows.append(("mean gen PPL", [mean(p) for p in ppl], 2))
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
    covers them all. `tokenizer` defaults to the one the records name (`tokenizer_of`).
    """
    if refined is None and drafts and all("draft_tokens" in r for r in drafts):
        drafts, refined = None, drafts
        names = {"draft": None, "refined": (names or {}).get("draft")}
    if tokenizer is None:
        from did_cli.io.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_of([*(drafts or []), *(refined or [])]))
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


def tokenizer_of(records: Sequence[dict]) -> str:
    """The tokenizer the first record that names one was made with (`model.tokenizer`), else
    "gpt2" (records of older versions name none; the fingerprint check still applies)."""
    for rec in records:
        name = (rec.get("model") or {}).get("tokenizer")
        if isinstance(name, str) and name:
            return name
    return "gpt2"


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


def check_target(path: str, inputs: Sequence[str | None] = ()) -> None:
    """Fail before any work when `path` cannot be written ('-': stdout closed) or is one of
    the `inputs` (the page would replace a file it shows)."""
    check_output(path, "-o", inputs)


def write_page(page: str, path: str) -> None:
    """Write the page to `path` ('-' = stdout) as did_cli.io.outputs does: a regular file is
    replaced atomically (temp file in the same folder, then rename), a symlink is followed, and
    a device or pipe (/dev/stdout, a FIFO) is written straight through."""
    data = page.encode("utf-8", "replace")  # a lone surrogate from a record must not abort the write
    if path == "-":
        write_stdout(data)
        return
    write_bytes(path, data)
