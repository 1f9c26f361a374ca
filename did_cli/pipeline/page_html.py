"""HTML pieces of `did show`: per-token spans whose texts concatenate to the decoded sample, one
column of shaded tokens, the legend and the style sheet.

Byte-level BPE (GPT-2) can split one UTF-8 character over several tokens; decoded alone, each
of them is a replacement character. Such tokens are grouped with their neighbours until the
group decodes cleanly, and the concatenation of all spans is checked against the decoding of the
whole sequence (a tokenizer for which per-token pieces do not add up falls back to decoding
growing prefixes).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
MAX_GROUP = 8  # tokens one character can span (UTF-8 has at most 4 bytes; margin for odd merges)
LEVELS = 10  # shading steps of the confidence scale
# C0 control characters (except tab, newline, carriage return) are shown as their pictures
_CONTROL = {c: chr(0x2400 + c) for c in range(32) if c not in (9, 10, 13)}
_CONTROL[127] = "\u2421"


def esc(value: Any) -> str:
    """HTML-escaped text (quotes included, so it is safe in attribute values too)."""
    return html.escape(str(value), quote=True).translate(_CONTROL)


class Pieces:
    """Cached single-token decodings of one tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self._cache: dict[int, str] = {}

    def one(self, t: int) -> str:
        s = self._cache.get(t)
        if s is None:
            s = self._cache[t] = self.tok.decode([t])
        return s

    def spans(self, ids: Sequence[int]) -> list[tuple[int, int, str]]:
        """(start, end, text) over indices of `ids`; the texts concatenate to decode(ids)."""
        ids = list(ids)
        full = self.tok.decode(ids)
        out, i, n = [], 0, len(ids)
        while i < n:
            j, text = i + 1, self.one(ids[i])
            if REPLACEMENT in text:
                # grow the group to where it holds the fewest replacement characters
                best = text.count(REPLACEMENT)
                for k in range(i + 2, min(n, i + MAX_GROUP) + 1):
                    cand = self.tok.decode(ids[i:k])
                    if cand.count(REPLACEMENT) < best:
                        j, text, best = k, cand, cand.count(REPLACEMENT)
                        if best == 0:
                            break
            out.append((i, j, text))
            i = j
        if "".join(s for _, _, s in out) == full:
            return out
        return _prefix_spans(self.tok, ids, full)


def _prefix_spans(tok: Any, ids: list[int], full: str) -> list[tuple[int, int, str]]:
    """Spans from decoding growing prefixes (slow, but right for any tokenizer)."""
    out, done, start = [], "", 0
    for j in range(1, len(ids) + 1):
        s = full if j == len(ids) else tok.decode(ids[:j])
        if s.startswith(done) and (j == len(ids) or not s.endswith(REPLACEMENT)):
            out.append((start, j, s[len(done) :]))
            done, start = s, j
    if start < len(ids) or done != full:
        return [(0, len(ids), full)] if ids else []
    return out


def level(c: float | None) -> int | None:
    """Shading step of a confidence (None for fixed positions and non-numbers)."""
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
        return None
    return min(LEVELS - 1, max(0, int(c * LEVELS)))


def palette() -> list[tuple[str, str]]:
    """(background, text colour) per shading step: white (0) to dark blue (1)."""
    lo, hi = (255, 255, 255), (8, 48, 107)
    out = []
    for k in range(LEVELS):
        f = (k + 0.5) / LEVELS
        rgb = tuple(round(a + (b - a) * f) for a, b in zip(lo, hi))
        out.append(("#{:02x}{:02x}{:02x}".format(*rgb), "#fff" if f > 0.55 else "#111"))
    return out


def column(
    pieces: Pieces,
    tokens: Sequence[int],
    confidence: Sequence[Any] | None,
    *,
    body_start: int,
    fixed: set[int],
    mask_id: int | None,
    remasked: dict[int, list[int]] | None = None,
    changed: dict[int, int] | None = None,
) -> str:
    """HTML of one sample's tokens from `body_start` on: each span shaded by its (lowest)
    confidence, re-masked positions (position -> stage numbers) and changed positions
    (position -> the other version's token id) marked, [MASK] shown as a marker."""
    remasked, changed = remasked or {}, changed or {}
    conf = list(confidence) if confidence is not None else []
    body = [p for p in range(body_start, len(tokens)) if tokens[p] != mask_id]
    spans = pieces.spans([tokens[p] for p in body])
    masks = [p for p in range(body_start, len(tokens)) if tokens[p] == mask_id]
    items = [(body[a], [body[k] for k in range(a, b)], text) for a, b, text in spans]
    items += [(p, [p], None) for p in masks]
    items.sort(key=lambda it: it[0])
    return "".join(_span(pieces, ps, text, conf, fixed, remasked, changed) for _, ps, text in items)


def _span(pieces, positions, text, conf, fixed, remasked, changed) -> str:
    cs = [conf[p] for p in positions if p < len(conf) and p not in fixed]
    cs = [c for c in cs if level(c) is not None]
    tip = [f"pos {positions[0]}" if len(positions) == 1 else f"pos {positions[0]}-{positions[-1]}"]
    if cs:
        c = min(cs)
        cls = [f"c{level(c)}"]
        tip.append(f"confidence {c:.3f}")
    elif conf:
        cls = ["f"]
        tip.append("fixed (BOS, prompt or suffix)")
    else:
        cls = ["n"]
        tip.append("no confidence in the record")
    if text is None:
        cls.append("m")
        text = "[MASK]"
    if remasked and any(p in remasked for p in positions):
        stages = sorted({s for p in positions for s in remasked.get(p, ())})
        cls.append("r")
        tip.append("re-masked in stage " + ", ".join(map(str, stages)))
    was = [changed[p] for p in positions if p in changed] if changed else None
    if was:
        cls.append("x")
        tip.append("changed; other version: " + repr("".join(pieces.one(t) for t in was if t is not None)))
    return f'<span class="{" ".join(cls)}" title="{esc("; ".join(tip))}">{esc(text)}</span>'


def legend(has_refined: bool) -> str:
    steps = "".join(f'<span class="c{k}">{k / LEVELS:.1f}</span>' for k in range(LEVELS))
    parts = [
        f"<p>Token shading = snapshot confidence (the probability the drafter gave the token "
        f"it committed), from 0 (white) to 1 (dark blue): {steps}</p>",
        '<p><span class="f">grey</span> = fixed positions (prompt, suffix) with no confidence; '
        '<span class="n">plain</span> = the record holds no confidence; '
        '<span class="m">[MASK]</span> = a position still masked. Hover a token for its position and '
        "figures.</p>",
    ]
    if has_refined:
        parts.append(
            '<p><span class="c0 r">red underline</span> = re-masked by a refine stage '
            "(the draft column marks what was re-masked; the refined column what was regenerated); "
            '<span class="c0 x">orange box</span> = the token differs between draft and refined.</p>'
        )
    return "<section class=legend><h2>Legend</h2>" + "".join(parts) + "</section>"


def css() -> str:
    shades = "".join(f".c{k}{{background:{bg};color:{fg}}}" for k, (bg, fg) in enumerate(palette()))
    return (
        "body{font:15px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 "
        "1em;color:#111}"
        "h1{font-size:1.4em}h2{font-size:1.15em;margin:.2em 0}h3{font-size:.95em;margin:.2em 0;color:#555}"
        "section{border-top:1px solid #ccc;padding:.6em 0}table{border-collapse:collapse;margin:.4em 0}"
        "td,th{border:1px solid #ddd;padding:.15em "
        ".5em;text-align:right}th{text-align:left;background:#f6f6f6}"
        ".cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:1em}"
        ".tokens{font:13px/1.7 ui-monospace,monospace;white-space:pre-wrap;overflow-wrap:anywhere;"
        "border:1px solid #ddd;padding:.4em}"
        ".f{background:#e4e4e4;color:#666}.n{color:#111}.m{background:#fde0ef;color:#8e0152}"
        ".r{border-bottom:3px solid #d7301f}.x{outline:2px solid #f28e2b;font-weight:bold}"
        ".legend span{padding:0 .3em}.kv{margin-right:.8em;white-space:nowrap}"
        ".figs{font-weight:600}.warn{color:#a50026}.own,.note{color:#555;font-size:.9em}" + shades
    )
