"""The JSONL sample format shared by `did draft`, `did refine` and `did eval-ppl`.

One JSON object per line (schema ``did.sample/1``; the full field list is in docs/formats.md).
Writers always emit the required fields; readers ask only for the fields they use (``need``) and
check the type of every field that is present, so that a bad file fails on its first bad line
with the line number and file name instead of deep inside a model call.
"""

from __future__ import annotations

import json
import math
import os
import sys
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

    if "id" in rec and not isinstance(rec["id"], str):
        raise bad(f"'id' must be a string, got {type(rec['id']).__name__}")
    if "text" in rec and not isinstance(rec["text"], str):
        raise bad(f"'text' must be a string, got {type(rec['text']).__name__}")
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
    return rec


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
    name = _source_name(source)
    need = ("schema", *need)
    if isinstance(source, (str, Path)):
        if str(source) == "-":
            stream, close = sys.stdin, False
        else:
            path = Path(source)
            if path.is_dir():
                raise DidError(f"{path} is a directory, not a JSONL file")
            try:
                stream, close = open(path, encoding="utf-8"), True
            except OSError as e:
                raise DidError(f"cannot read {path}: {e.strerror or e}") from None
    else:
        stream, close = source, False
    n = 0
    try:
        for line_no, line in enumerate(stream, 1):
            if not line.strip():
                continue
            yield parse_line(line, line_no, vocab_size=vocab_size, need=need, source=name)
            n += 1
    except UnicodeDecodeError as e:
        raise DidError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    finally:
        if close:
            stream.close()
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


def dumps(rec: dict) -> str:
    """One record as one JSON line (no trailing newline). NaN/inf are refused, not written."""
    try:
        return json.dumps(rec, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise DidError(f"record {rec.get('id', '?')!r} is not valid JSON: {e}") from None


class RecordWriter:
    """Write records as JSONL to a file or stdout, one whole line at a time.

    ``RecordWriter(None)`` or ``RecordWriter("-")`` writes to stdout. A file path is checked
    and locked at construction (did_cli.io.outputs), so an unwritable destination, or one that
    another process is writing, fails before any work. Records go to ``<path>.partial``, which
    is renamed to ``<path>`` when the writer closes without an error; after a crash or Ctrl-C
    the final path is untouched and ``<path>.partial`` holds every record written so far, each
    on a complete line (a write that fails midway is truncated back to the previous line end).
    A symlink is followed (its target is replaced); a device, named pipe or socket is written
    straight through and never replaced.
    """

    def __init__(self, dest: str | Path | None):
        from did_cli.io.outputs import Lock, special_mode, target

        self.dest = None if dest is None or str(dest) == "-" else Path(dest)
        self.count = 0
        self._good = 0
        self._fh: IO[bytes] | None = None
        self._lock = None
        self.partial: Path | None = None
        if self.dest is None:
            self.name = "stdout"
            return
        self.name = str(self.dest)
        self._target = target(self.dest)
        if self._target.special:
            where = self.dest
        else:
            self._lock = Lock(self._target)
            self.partial = where = self._target.real.with_name(self._target.real.name + ".partial")
        try:
            self._fh = open(where, special_mode() if self.partial is None else "wb", buffering=0)
        except BaseException as e:
            if self._lock is not None:
                self._lock.release()
            if isinstance(e, OSError):
                raise DidError(f"cannot write {self.dest}: {e.strerror or e}") from None
            raise

    def write(self, rec: dict) -> None:
        line = dumps(rec) + "\n"
        if self._fh is None:
            if self.dest is not None:
                raise DidError(f"{self.name}: writer is closed")
            from did_cli.io.outputs import write_stdout

            write_stdout(line)
        else:
            data = memoryview(line.encode("utf-8"))
            try:
                # unbuffered: loop over short writes so nothing sits in a hidden buffer
                while data:
                    data = data[self._fh.write(data) or 0 :]
            except BaseException as e:
                # drop a half-written line so the file never ends mid-record
                if self.partial is not None:  # a pipe or device cannot be truncated
                    try:
                        self._fh.truncate(self._good)
                        self._fh.seek(self._good)
                    except (OSError, ValueError):
                        pass
                if isinstance(e, OSError):
                    raise DidError(f"cannot write {self.name}: {e.strerror or e}") from None
                raise
            if self.partial is not None:
                self._good = self._fh.tell()
        self.count += 1

    def close(self, ok: bool = True) -> None:
        """Finish the file: rename `.partial` to the final name when `ok`, else leave it when it
        holds a record (removed when empty); the lock goes either way."""
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.close()
            if ok and self.partial is not None:
                os.replace(self.partial, self._target.real)
            elif self.partial is not None and self._good == 0:  # nothing to recover: no leftover
                self.partial.unlink(missing_ok=True)
        except OSError as e:
            if ok:
                raise DidError(f"cannot write {self.name}: {e.strerror or e}") from None
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


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


__all__ = [
    "SCHEMA",
    "REQUIRED",
    "validate",
    "parse_line",
    "read_records",
    "dumps",
    "unique_ids",
    "RecordWriter",
    "make_record",
]
