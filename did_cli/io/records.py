"""The JSONL sample format shared by `did draft`, `did refine` and `did eval-ppl`.

One JSON object per line (schema ``did.sample/1``; the full field list is in docs/formats.md).
Writers always emit the required fields; readers ask only for the fields they use (``need``) and
check the type of every field that is present, so that a bad file fails on its first bad line
with the line number and file name instead of deep inside a model call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from did_cli.errors import DidError
from did_cli.io.jsonl import at, decode

SCHEMA = "did.sample/1"
REQUIRED = ("schema", "id", "tokens", "confidence", "text")

# Optional fields and the JSON types they must have when present.
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "prompt_len": (int,),
    "suffix_len": (int,),
    "model": (dict,),
    "draft": (dict,),
    "nfe": (int,),
    "forward_passes": (int,),
    "seconds": (int, float),
    "stages": (list,),
    "draft_tokens": (list,),
    "entropy_rejections": (int,),
    "low_entropy": (bool,),
    "entropy_truncated": (bool,),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(
    rec: Any,
    line_no: int | None = None,
    vocab_size: int | None = None,
    *,
    need: Sequence[str] = REQUIRED,
    source: str | None = None,
) -> dict:
    """Check one record and return it; raise DidError with a one-line message otherwise.

    `need` lists the fields that must be present (all required ones by default); fields that
    are present are type-checked whether needed or not. Token ids are checked against
    `vocab_size`, or when that is None against the record's own ``model.vocab_size``.
    """
    where = at(line_no, source)

    def bad(msg: str) -> DidError:
        return DidError(f"{where}{msg}")

    if not isinstance(rec, dict):
        raise bad(f"not a JSON object (got {type(rec).__name__})")
    schema = rec.get("schema")
    if schema is None:
        raise bad(f"missing 'schema' (expected {SCHEMA!r})")
    if schema != SCHEMA:
        raise bad(f"unsupported schema {schema!r} (this version reads {SCHEMA!r})")
    missing = [k for k in need if k not in rec]
    if missing:
        raise bad(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)}")

    for key in ("id", "text"):
        if key in rec and not isinstance(rec[key], str):
            raise bad(f"'{key}' must be a string, got {type(rec[key]).__name__}")
        if key in rec and not _is_text(rec[key]):
            raise bad(
                f"'{key}' holds an unpaired surrogate (\\u{_surrogate(rec[key]):04x}), which is not text"
            )
    for key, types in _OPTIONAL_TYPES.items():
        if key in rec and rec[key] is not None:
            v = rec[key]
            ok = isinstance(v, types) and (bool in types or not isinstance(v, bool))
            if not ok:
                raise bad(f"'{key}' has type {type(v).__name__}")

    tokens = rec.get("tokens")
    if tokens is not None:
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise bad("'tokens' must be a list of integers")
        if (
            vocab_size is None
            and isinstance(rec.get("model"), dict)
            and _is_int(rec["model"].get("vocab_size"))
        ):
            vocab_size = rec["model"]["vocab_size"]
        hi = vocab_size if vocab_size is not None else math.inf
        for pos, t in enumerate(tokens):
            if not 0 <= t < hi:
                raise bad(f"token id {t} at position {pos} outside [0, {hi})")
    conf = rec.get("confidence")
    if conf is not None:
        if not isinstance(conf, list) or not all(
            c is None or (isinstance(c, (int, float)) and not isinstance(c, bool)) for c in conf
        ):
            raise bad("'confidence' must be a list of numbers or null")
        for pos, c in enumerate(conf):
            if c is not None and not 0.0 <= c <= 1.0:
                raise bad(f"'confidence' {c!r} at position {pos} outside [0, 1] (a probability, or null)")
        if tokens is not None and len(conf) != len(tokens):
            raise bad(f"'confidence' has {len(conf)} entries but 'tokens' has {len(tokens)}")
    if tokens is not None:
        for key in ("prompt_len", "suffix_len"):
            v = rec.get(key)
            if v is not None and not 0 <= v <= len(tokens):
                raise bad(f"'{key}' {v} outside [0, {len(tokens)}]")
    check_refinement(rec, bad, vocab_size)
    return rec


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _surrogate(s: str) -> int:
    return next(ord(c) for c in s if 0xD800 <= ord(c) <= 0xDFFF)


_STAGE_TYPES: dict[str, tuple[type, ...]] = {
    "block_size": (int,),
    "ratio": (int, float),
    "changed": (int,),
    "nfe": (int,),
    "forward_passes": (int,),
    "seconds": (int, float),
    "path": (str,),
}


def check_refinement(rec: dict, bad: Any, vocab_size: int | None = None) -> None:
    """The fields a refinement adds, checked as `did show` and `did refine` use them: `stages`
    a list of objects whose `remasked` is a list of positions inside the record and whose
    counts are numbers; `draft_tokens` ids like `tokens`, as many."""
    n = len(rec["tokens"]) if isinstance(rec.get("tokens"), list) else None
    for k, st in enumerate(rec.get("stages") or [], 1):
        if not isinstance(st, dict):
            raise bad(f"'stages' entry {k} is a {type(st).__name__}, not an object")
        for key, types in _STAGE_TYPES.items():
            v = st.get(key)
            if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
                raise bad(f"'stages' entry {k}: '{key}' has type {type(v).__name__}")
        rm = st.get("remasked")
        if rm is not None and (not isinstance(rm, list) or not all(_is_int(p) for p in rm)):
            raise bad(f"'stages' entry {k}: 'remasked' must be a list of positions, got {type(rm).__name__}")
        if rm and n is not None and not all(0 <= p < n for p in rm):
            raise bad(f"'stages' entry {k}: 'remasked' holds a position outside [0, {n})")
    dt = rec.get("draft_tokens")
    if dt is not None:
        if not all(_is_int(t) for t in dt):
            raise bad("'draft_tokens' must be a list of integers")
        hi = vocab_size if vocab_size is not None else math.inf
        if not all(0 <= t < hi for t in dt):
            raise bad(f"'draft_tokens' holds an id outside [0, {hi})")
        if n is not None and len(dt) != n:
            raise bad(f"'draft_tokens' has {len(dt)} entries but 'tokens' has {n}")


def parse_line(
    line: str,
    line_no: int | None = None,
    *,
    vocab_size: int | None = None,
    need: Sequence[str] = REQUIRED,
    source: str | None = None,
) -> dict:
    """Decode one JSONL line and validate it."""
    rec = decode(line, at(line_no, source))
    return validate(rec, line_no, vocab_size, need=need, source=source)


def _source_name(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return "stdin" if str(source) == "-" else str(source)
    return getattr(source, "name", None) or "<stream>"


def read_records(
    source: str | Path | IO[str],
    *,
    vocab_size: int | None = None,
    need: tuple[str, ...] = ("tokens",),
) -> Iterator[dict]:
    """Yield validated records from a JSONL file, `-` (stdin) or an open text stream.

    Blank lines are skipped. Every error names the line number and the source; a source with
    no records at all raises ``DidError("no records in <source>")`` once it is exhausted.
    """
    from did_cli.io.bounded import lines

    name = _source_name(source)
    need = ("schema", *need)
    if isinstance(source, (str, Path)) and str(source) != "-" and Path(source).is_dir():
        raise DidError(f"{source} is a directory, not a JSONL file")
    n = 0
    for line_no, line in lines(source, name):
        if not line.strip():
            continue
        yield parse_line(line, line_no, vocab_size=vocab_size, need=need, source=name)
        n += 1
    if n == 0:
        raise DidError(f"no records in {name}")


def unique_ids(records: Iterable[dict], source: str = "the input") -> Iterator[dict]:
    """Pass records through, raising DidError at the first id seen twice (ids are unique in a
    file: a refined record is matched to its draft by id)."""
    seen: dict[str, int] = {}
    for k, rec in enumerate(records, 1):
        rid = rec.get("id")
        if rid in seen:
            raise DidError(
                f"record {k} of {source}: id {rid!r} repeats record {seen[rid]} (ids must be unique in a "
                "file)"
            )
        seen[rid] = k
        yield rec


def _clean_conf(c: Any) -> float | None:
    if c is None:
        return None
    c = float(c)
    return c if math.isfinite(c) else None


def make_record(
    tokens: Sequence[int],
    confidence: Sequence[float | None] | None = None,
    *,
    id: str,
    tokenizer: Any = None,
    text: str | None = None,
    prompt_len: int = 1,
    mask_id: int | None = None,
    bos_id: int | None = None,
    **extra: Any,
) -> dict:
    """Build a valid record.

    `text` defaults to ``tokenizer.decode`` of the tokens with the leading BOS and every [MASK]
    removed (`mask_id`/`bos_id` default to the tokenizer's). Confidence of the fixed prompt
    positions ``[0, prompt_len)`` is stored as null. `extra` adds optional fields (model, draft,
    nfe, seconds, stages, ...); None values are left out.
    """
    tokens = [int(t) for t in tokens]
    if confidence is None:
        confidence = [None] * len(tokens)
    conf = [None if i < prompt_len else _clean_conf(c) for i, c in enumerate(confidence)]
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_id", None)
    if bos_id is None:
        bos_id = getattr(tokenizer, "bos_id", None)
    if text is None:
        if tokenizer is None:
            raise DidError("make_record needs a tokenizer or a text")
        body = tokens[1:] if tokens and bos_id is not None and tokens[0] == bos_id else tokens
        text = tokenizer.decode([t for t in body if t != mask_id])
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "id": str(id),
        "tokens": tokens,
        "confidence": conf,
        "text": text,
    }
    if prompt_len != 1:
        rec["prompt_len"] = int(prompt_len)
    rec.update({k: v for k, v in extra.items() if v is not None})
    return validate(rec)


def free_span(rec: dict) -> tuple[int, int]:
    """[lo, hi): the generated positions of a record, between its fixed prefix (BOS and a
    prompt, `prompt_len`) and its fixed suffix (`suffix_len`)."""
    n = len(rec["tokens"])
    return int(rec.get("prompt_len", 1) or 0), n - int(rec.get("suffix_len", 0) or 0)


def stage_record(
    block_size: int,
    ratio: float,
    remasked: list[int],
    changed: int,
    counts: dict,
    seconds: float,
    path: str,
    settings: dict,
) -> dict:
    """One entry of a refined record's `stages`: what a refinement stage did to the record.
    `counts`: {"nfe", "forward_passes"}; `settings`: the sampler settings worth recording (None
    values left out)."""
    entry = {"block_size": block_size, "ratio": ratio, "remasked": list(remasked), "changed": int(changed)}
    entry.update(counts)
    entry.update({"seconds": round(seconds, 4), "path": path})
    entry.update({k: v for k, v in settings.items() if v is not None})
    return entry


def refined_record(
    draft: dict,
    tokens: list[int],
    confidence: list[float | None],
    stages: list[dict],
    counts: dict,
    seconds: float,
    tokenizer: Any,
) -> dict:
    """The record of a refined draft: its new tokens, the confidences of the generated span
    (fixed positions keep the draft's), the draft's tokens, the stages appended to any earlier
    ones, and the counts and time added to the draft's. Unchanged tokens keep the draft's text
    byte for byte."""
    n = len(tokens)
    lo, hi = free_span(draft)
    old = draft.get("confidence") or [None] * n
    conf = [confidence[p] if lo <= p < hi else old[p] for p in range(n)]
    skip = ("schema", "id", "tokens", "confidence", "text", "prompt_len")
    extra = {k: v for k, v in draft.items() if k not in skip}
    extra["draft_tokens"] = draft.get("draft_tokens") or list(draft["tokens"])
    extra["stages"] = list(draft.get("stages") or []) + stages
    extra["nfe"] = int(draft.get("nfe") or 0) + counts["nfe"]
    extra["forward_passes"] = (
        int(draft.get("forward_passes", draft.get("nfe")) or 0) + counts["forward_passes"]
    )
    extra["seconds"] = round(float(draft.get("seconds") or 0.0) + seconds, 4)
    rec = make_record(tokens, conf, id=draft["id"], tokenizer=tokenizer, prompt_len=lo, **extra)
    if tokens == draft["tokens"] and "text" in draft:
        rec["text"] = draft["text"]
    return rec


__all__ = [
    "SCHEMA",
    "REQUIRED",
    "validate",
    "parse_line",
    "read_records",
    "unique_ids",
    "make_record",
    "free_span",
    "stage_record",
    "refined_record",
]
