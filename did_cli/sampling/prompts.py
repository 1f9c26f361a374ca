"""Prompts and suffixes for drafting: reading a prompts file and turning prompts into the fixed
tokens of each sample (BOS + prompt at the start, the suffix at the end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from did_cli.errors import DidError, UsageError
from did_cli.io.jsonl import at, decode

if TYPE_CHECKING:
    from did_cli.sampling.sampler_config import DraftConfig


def read_prompts(source: str | Any) -> tuple[list[str], list[str]]:
    """Read a prompts file (JSONL, `-` = stdin, or an open text stream): one object per line,
    `{"id": "q1", "prompt": "text"}`; `id` is optional (default p<k>, k counting prompts from 0).
    Blank lines are skipped. Returns (ids, prompts); a bad line raises DidError naming it."""
    from did_cli.io.bounded import lines

    if isinstance(source, str):
        name = "stdin" if source == "-" else source
        src = lines(source, "stdin" if source == "-" else f"--prompts {source}")
    else:
        name = getattr(source, "name", "<stream>")
        src = lines(source, name)
    ids: list[str] = []
    texts: list[str] = []
    for no, line in src:
        if not line.strip():
            continue
        where = at(no, name)
        obj = decode(line, where, "a prompt")
        if not isinstance(obj, dict):
            raise DidError(
                f'{where}expected an object {{"id": ..., "prompt": ...}}, got {type(obj).__name__}'
            )
        extra = sorted(set(obj) - {"id", "prompt"})
        if extra:
            raise DidError(f"{where}unknown key {extra[0]!r} (a line holds 'id' and 'prompt')")
        if not isinstance(obj.get("prompt"), str):
            raise DidError(
                f"{where}'prompt' must be a string" if "prompt" in obj else f"{where}missing 'prompt'"
            )
        if not obj["prompt"]:
            raise DidError(f"{where}empty prompt")
        pid = obj.get("id", f"p{len(texts)}")
        if not isinstance(pid, str) or not pid:
            raise DidError(f"{where}'id' must be a non-empty string")
        for key, text in (("prompt", obj["prompt"]), ("id", pid)):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                raise DidError(f"{where}'{key}' holds an unpaired surrogate, which is not text")
        if pid in ids:
            raise DidError(f"{where}duplicate id {pid!r}")
        ids.append(pid)
        texts.append(obj["prompt"])
    if not texts:
        raise DidError(f"no prompts in {name}")
    return ids, texts


@dataclass
class Prompt:
    """One resolved prompt: the fixed tokens after BOS and at the end of its samples."""

    id: str
    tokens: list[int]
    suffix: list[int]


def _encode(item: Any, tok: Any, what: str) -> list[int]:
    if isinstance(item, str):
        return tok.encode(item) if item else []
    if isinstance(item, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        return [int(t) for t in item]
    raise UsageError(f"{what}: expected text or a list of token ids, got {type(item).__name__}")


def resolve_prompts(cfg: DraftConfig, tokenizer: Any, length: int) -> list[Prompt]:
    """Encode `cfg.prompts` / `cfg.suffix` and check that they fit `length` with at least one
    position left to generate. No prompts gives one empty prompt (BOS only). Raises UsageError
    with a one-line message; needs no weights, so the CLI runs it before loading the model."""
    suffix = [] if cfg.suffix is None else _encode(cfg.suffix, tokenizer, "--suffix")
    if cfg.suffix is not None and not suffix:
        raise UsageError("--suffix is empty (it encodes to no tokens)")
    items = [[]] if cfg.prompts is None else list(cfg.prompts)
    ids = list(cfg.prompt_ids) if cfg.prompt_ids is not None else [f"p{k}" for k in range(len(items))]
    vocab = getattr(tokenizer, "vocab_size", None)
    bad = {getattr(tokenizer, "mask_id", None)} - {None}
    out = []
    for pid, item in zip(ids, items):
        toks = _encode(item, tokenizer, f"prompt {pid!r}")
        if cfg.prompts is not None and not toks:
            raise UsageError(f"prompt {pid!r} is empty (it encodes to no tokens)")
        for t in toks + suffix:
            if (vocab is not None and not 0 <= t < vocab) or t in bad:
                raise UsageError(
                    f"prompt {pid!r}: token id {t} is not a text token of the model's vocabulary"
                )
        used = 1 + len(toks) + len(suffix)
        if used >= length:
            parts = f"BOS + {len(toks)} prompt tokens" + (f" + {len(suffix)} suffix tokens" if suffix else "")
            raise UsageError(
                f"prompt {pid!r}: {parts} = {used} leave no position to generate in --length {length}"
            )
        out.append(Prompt(pid, toks, suffix))
    return out
