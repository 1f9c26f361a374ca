"""Is the scorer the model that made the samples, or the model it was adapted from?

A model adapted from a causal LM keeps much of what that LM knows, so the LM finds its samples
likely: scoring them with it (or with a sibling that shares its tokenizer, such as the base and
instruct versions of one model) flatters them. `did eval-ppl` then prints one warning line and
records the finding in its JSON.

What a record says about its model (`model`: `path`, `fingerprint` of the tokenizer, and a
`source` when the maker recorded one) is completed from the model's config.json when the
folder can still be found: its `source`, and for a Llama-family (adapted) model its
`tokenizer`, which is the source model it was read from (did_cli.io.pretrained).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from did_cli.evaluation.scorer_files import file_sha256
from did_cli.io.hf_safety import cached_snapshot, looks_like_path

MAX_CONFIG_BYTES = 16 << 20
RELATIONS = ("itself", "source", "family")
"""From strongest to weakest: the scorer made the samples, it is the model's source, it shares
its tokenizer with the model's source."""


def _read_config(path: Path) -> dict | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        raw = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    body = raw.get("model")  # a run folder's config.json holds the model config under "model"
    return body if isinstance(body, dict) else raw


def model_config(path: str) -> dict | None:
    """The model config of a model path as records name it (a model folder, a run folder,
    RUN/best, RUN/latest), read without loading weights; None when it cannot be found."""
    p = Path(path).expanduser()
    for cand in (p / "config.json", p.parent / "config.json" if p.name in ("best", "latest") else None):
        if cand is not None and (cfg := _read_config(cand)) is not None:
            return cfg
    return None


def model_sources(minfo: dict) -> list[str]:
    """The models that the model of a record's `model` field was adapted from (names as stored:
    paths, GGUF files or hub names)."""
    found = [minfo.get("source")]
    path = minfo.get("path")
    cfg = model_config(path) if isinstance(path, str) else None
    if cfg is not None:
        found.append(cfg.get("source"))
        if cfg.get("family") == "llama":
            found.append(cfg.get("tokenizer"))
    out: list[str] = []
    for s in found:
        if isinstance(s, str) and s and s not in out:
            out.append(s)
    return out


@functools.lru_cache(maxsize=32)
def _sha_of(path: str, size: int, mtime: float) -> str:
    return file_sha256(path)


def _sha(p: Path) -> str:
    st = p.stat()
    return _sha_of(str(p), st.st_size, st.st_mtime)


def _names(name: str) -> set[str]:
    """The names one model goes by: as given, its resolved path, its cached hub snapshot."""
    out = {name}
    p = Path(name).expanduser()
    try:
        if p.exists():
            out.add(str(p.resolve()))
        elif not looks_like_path(name) and (snap := cached_snapshot(name)) is not None:
            out.add(str(snap.resolve()))
    except OSError:
        pass
    return out


def is_scorer(name: str, scorer: Any) -> bool:
    """Whether model `name` (a path, a GGUF file, a hub name) is the scorer's model: by name,
    or for a GGUF file by content (its SHA-256)."""
    ident = set(getattr(scorer, "identity", ()) or ())
    if _names(name) & ident:
        return True
    p = Path(name).expanduser()
    if not (p.suffix.lower() == ".gguf" and p.is_file()):
        return False
    try:
        gguf = getattr(scorer, "gguf", None)
        if gguf is not None and Path(gguf).is_file():
            if Path(gguf).stat().st_size == p.stat().st_size and _sha(Path(gguf)) == _sha(p):
                return True
        return any(i.startswith("sha256:") for i in ident) and f"sha256:{_sha(p)}" in ident
    except OSError:
        return False


def _scorer_fingerprint(scorer: Any) -> str | None:
    """The scorer's tokenizer fingerprint, computed as records compute theirs."""
    from did_cli.io.tokenizer import Tokenizer

    try:
        return Tokenizer(scorer.tokenizer, str(scorer.name)).fingerprint
    except Exception:  # noqa: BLE001 - a tokenizer our wrapper cannot take has no fingerprint
        return None


def relation(minfo: dict, scorer: Any, fingerprint: Any = None) -> tuple[str, str] | None:
    """(relation, the model it concerns) of the scorer to the model of one record's `model`
    field, strongest first (`RELATIONS`), or None. `fingerprint`: a callable giving the
    scorer's tokenizer fingerprint (computed only when needed)."""
    path = minfo.get("path")
    if isinstance(path, str) and path and is_scorer(path, scorer):
        return "itself", path
    sources = model_sources(minfo)
    for s in sources:
        if is_scorer(s, scorer):
            return "source", s
    fp = minfo.get("fingerprint")
    if sources and isinstance(fp, str) and fingerprint is not None and fingerprint() == fp:
        return "family", sources[0]
    return None


def self_scoring(inputs: dict[str, list[dict]], scorer: Any) -> list[dict]:
    """Per input whose records were made by the scorer, by a model adapted from it, or by one
    adapted from a model sharing its tokenizer: {"input", "model", "relation", "concerns"}."""
    fingerprint = functools.cache(lambda: _scorer_fingerprint(scorer))
    found = []
    for name, recs in inputs.items():
        seen: dict[str, tuple[str, str] | None] = {}
        for rec in recs:
            minfo = rec.get("model")
            if not isinstance(minfo, dict):
                continue
            key = json.dumps(minfo, sort_keys=True, default=str)
            if key not in seen:
                seen[key] = relation(minfo, scorer, fingerprint)
                if seen[key] is not None:
                    rel, concerns = seen[key]
                    found.append(
                        {"input": name, "model": minfo.get("path"), "relation": rel, "concerns": concerns}
                    )
    return found


OFFLINE_SCORERS = ("gemma3", "smollm2")
PHRASES = {
    "itself": "the scorer is the model that made {inputs}",
    "source": "the scorer is the model that the model of {inputs} was adapted from ({concerns})",
    "family": "the scorer shares its tokenizer with {concerns}, the source of the model of {inputs} "
    "(likely the same model family)",
}


def warning_line(found: list[dict], scorer: Any = None) -> str:
    """One line saying what `self_scoring` found and which offline scorers to use instead."""
    parts = []
    for rel in RELATIONS:
        hits = [f for f in found if f["relation"] == rel]
        if hits:
            inputs = ", ".join(dict.fromkeys(f["input"] for f in hits))
            concerns = ", ".join(dict.fromkeys(str(f["concerns"]) for f in hits))
            parts.append(PHRASES[rel].format(inputs=inputs, concerns=concerns))
    ident = getattr(scorer, "identity", ()) or ()
    others = " or ".join(f"--scorer {n}" for n in OFFLINE_SCORERS if n not in ident)
    return (
        "; ".join(parts)
        + f": its gen PPL flatters those samples; score them with a model of another family (e.g. {others})"
    )
