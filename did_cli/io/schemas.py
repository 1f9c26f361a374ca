"""Schemas of the JSON files `did` reads back: a checkpoint's config.json, prepared data's
meta.json, a checkpoint's manifest.json, a run's best.json and train_state/state.json. Every
field is checked (type, range, relations) before anything uses it, so a damaged or hand-edited
file is one line naming the file and the field, never a traceback deep in a model call.

A check is a function of the value that returns what is wrong with it, or None.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from did_cli.errors import DidError

Check = Callable[[Any], "str | None"]
SHA256 = re.compile(r"^[0-9a-f]{64}$")
STEP_NAME = re.compile(r"^step-\d{8,}$")


def kind(v: Any) -> str:
    """The JSON name of a value's type."""
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__
    )


def _shown(v: Any) -> str:
    try:
        return json.dumps(v)[:40]
    except (TypeError, ValueError):
        return repr(v)[:40]


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {kind(v)} {_shown(v)}"
        if lo is not None and v < lo:
            return f"is {v}, must be at least {lo}"
        if hi is not None and v > hi:
            return f"is {v}, must be at most {hi}"
        return None

    return check


def number(lo: float = -math.inf, hi: float = math.inf, below_hi: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"must be a finite number, got {kind(v)} {_shown(v)}"
        if v < lo or v > hi or (below_hi and v == hi):
            return f"is {v}, must be in [{lo:g}, {hi:g}{')' if below_hi else ']'}"
        return None

    return check


def text(pattern: re.Pattern | None = None, choices: tuple[str, ...] | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, got {kind(v)} {_shown(v)}"
        if choices is not None and v not in choices:
            return f"is {v!r}, must be one of {', '.join(map(repr, choices))}"
        if pattern is not None and not pattern.match(v):
            return f"is {v[:40]!r}, not of the form {pattern.pattern}"
        return None

    return check


def nullable(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def list_of(item: Check, min_len: int = 0) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return f"must be an array, got {kind(v)} {_shown(v)}"
        if len(v) < min_len:
            return f"must hold at least {min_len} entries"
        for i, x in enumerate(v):
            why = item(x)
            if why:
                return f"entry {i} {why}"
        return None

    return check


def object_of(value: Check, key: Check | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return f"must be an object, got {kind(v)} {_shown(v)}"
        for k, x in v.items():
            why = (key(k) if key else None) or value(x)
            if why:
                return f"entry {k[:40]!r} {why}"
        return None

    return check


def any_json(v: Any) -> str | None:
    return None


def check_object(
    obj: Any, spec: dict[str, Check], required: tuple[str, ...], where: str, what: str, hint: str = ""
) -> dict:
    """`obj` when it is a JSON object whose `required` keys are present and whose keys in `spec`
    pass their checks; DidError '{where}: ...{hint}' otherwise. `what` names the object."""
    if not isinstance(obj, dict):
        raise DidError(f"{where}: expected a JSON object of {what}, got a JSON {kind(obj)}{hint}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise DidError(f"{where}: missing {', '.join(map(repr, missing))} (a damaged or foreign file){hint}")
    for key, check in spec.items():
        if key in obj:
            why = check(obj[key])
            if why:
                raise DidError(f"{where}: {key!r} {why}{hint}")
    return obj


# ------------------------------------------------------------------------------ config.json

MODEL_REQUIRED = ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim", "model_length")
POSITIVE = integer(1)
MODEL_SPEC: dict[str, Check] = {
    "vocab_size": integer(2, 2**31 - 1),
    "hidden_dim": POSITIVE,
    "n_blocks": POSITIVE,
    "n_heads": POSITIVE,
    "cond_dim": POSITIVE,
    "model_length": POSITIVE,
    "mlp_ratio": POSITIVE,
    "mask_id": integer(),
    "bos_id": integer(),
    "eos_id": integer(),
    "tokenizer": text(),
    "dropout": number(0.0, 1.0, below_hi=True),
    "block_sizes": list_of(POSITIVE),
    "block_size": POSITIVE,
    "step": integer(0),
    "clip_ranges": object_of(list_of(number(0.0, 1.0)), key=text(re.compile(r"^\d+$"))),
}


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_config(body: Any, where: str) -> dict:
    """The model settings of a checkpoint's config.json: every field's type and range, the ids
    inside the vocabulary, the block sizes dividing the length, and a model that fits in this
    machine's memory (a config asking for 4,000,000-wide layers is damaged, not a model)."""
    check_object(body, MODEL_SPEC, MODEL_REQUIRED, where, "model settings")
    V = body["vocab_size"]
    for key in ("mask_id", "bos_id", "eos_id"):
        v = body.get(key)
        if v is not None and not 0 <= v < V:
            raise DidError(f"{where}: {key} {v} outside vocab_size {V}")
    for b in body.get("block_sizes") or []:
        if body["model_length"] % b:
            raise DidError(f"{where}: block size {b} does not divide model_length {body['model_length']}")
    for b, r in (body.get("clip_ranges") or {}).items():
        if len(r) != 2 or not r[0] < r[1]:
            raise DidError(f"{where}: clip range of block size {b} must be [low, high] with low < high")
    d, m = body["hidden_dim"], body.get("mlp_ratio", 4) * body["hidden_dim"]
    params = 2 * V * d + body["n_blocks"] * (4 * d * d + 2 * d * m + 6 * d * body["cond_dim"])
    mem = physical_memory()
    if mem is not None and 4 * params > mem:
        raise DidError(
            f"{where}: a model of {params:.3g} parameters needs {4 * params / 2**30:,.0f} GiB in float32, "
            f"more than this machine's {mem / 2**30:.0f} GiB of memory (a damaged config, or a model "
            "too large for this machine: hidden_dim, n_blocks and vocab_size set its size)"
        )
    return body


def check_run_config(obj: Any, where: str) -> dict:
    """A run folder's config.json: its sections are objects, its model settings a model's."""
    spec = {k: object_of(any_json) for k in ("model", "train", "options", "data")}
    check_object(obj, spec, (), where, "run settings")
    if "model" in obj and "family" not in obj["model"]:  # the Llama family: did_cli.io.model_folder
        check_model_config(obj["model"], f"{where} 'model'")
    return obj


def check_clip_tensors(values: dict[str, Any], source: str) -> dict[str, float]:
    """The learned clip range stored beside the weights (`sampling_eps_min`/`_max`): one
    finite number each in [0, 1], min below max."""
    out = {}
    for k, t in values.items():
        if t.numel() != 1 or not t.is_floating_point() or not math.isfinite(float(t.reshape(-1)[0])):
            raise DidError(
                f"{source}: tensor {k} must hold one finite number, got shape {list(t.shape)} {t.dtype}"
            )
        out[k] = float(t.float().reshape(-1)[0])
        if not 0.0 <= out[k] <= 1.0:
            raise DidError(f"{source}: tensor {k} is {out[k]}, outside [0, 1]")
    if len(out) == 2 and not out["sampling_eps_min"] < out["sampling_eps_max"]:
        raise DidError(f"{source}: sampling_eps_min {out['sampling_eps_min']} is not below sampling_eps_max")
    return out


# ------------------------------------------------------------------------------ meta.json

META_REQUIRED = ("seq_len", "vocab_size", "dtype", "splits", "tokenizer")
META_SPEC: dict[str, Check] = {
    "format": text(),
    "seq_len": integer(2, 2**24),
    "vocab_size": integer(2, 2**32),
    "dtype": text(choices=("uint16", "uint32")),
    "splits": object_of(object_of(nullable(integer(0))), key=text(choices=("train", "validation"))),
    "tokenizer": text(),
    "tokenizer_fingerprint": nullable(text()),
    "mask_id": nullable(integer(0)),
    "bos_id": nullable(integer(0)),
    "eos_id": nullable(integer(0)),
    "row_layout": text(choices=("bos", "raw")),
    "layout": text(),
    "sources": list_of(text()),
    "val_docs": nullable(integer(0)),
    "val_fraction": nullable(number(0.0, 1.0, below_hi=True)),
    "content_hash": text(),
}


def check_meta(meta: Any, where: str) -> dict:
    """meta.json of prepared data: every field, each split's row count, ids inside the
    vocabulary, and a dtype that holds every id."""
    hint = "; re-run `did prepare`"
    check_object(meta, META_SPEC, META_REQUIRED, where, "prepared-data settings", hint)
    for name, split in meta["splits"].items():
        if "rows" not in split:
            raise DidError(f"{where}: split {name!r} has no 'rows'{hint}")
    V = meta["vocab_size"]
    for key in ("mask_id", "bos_id", "eos_id"):
        if meta.get(key) is not None and meta[key] >= V:
            raise DidError(f"{where}: {key} {meta[key]} outside vocab_size {V}{hint}")
    if meta["dtype"] == "uint16" and V > 65536:
        raise DidError(f"{where}: dtype uint16 cannot hold the ids of vocab_size {V}{hint}")
    return meta


# -------------------------------------------------------------------------- checkpoint files


def safe_relative(rel: Any) -> str | None:
    """What is wrong with a manifest path: it must be a plain relative path inside the
    checkpoint (no '..', no absolute path, no empty or '.' part). Checked on the text alone,
    before anything on disk is looked at."""
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    p = PurePosixPath(rel)
    if (
        p.is_absolute()
        or "\\" in rel
        or "\0" in rel
        or any(part in ("", ".", "..") for part in rel.split("/"))
    ):
        return "leaves the checkpoint folder"
    return None


MANIFEST_SPEC: dict[str, Check] = {
    "format": text(),
    "files": object_of(
        lambda v: check_entry(v),
        key=safe_relative,
    ),
}


def check_entry(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object with 'bytes' and 'sha256', got {kind(v)}"
    for key, check in (("bytes", integer(0)), ("sha256", text(SHA256))):
        if key not in v:
            return f"has no {key!r}"
        why = check(v[key])
        if why:
            return f"'{key}' {why}"
    return None


def check_manifest(obj: Any, where: str) -> dict:
    return check_object(obj, MANIFEST_SPEC, ("files",), where, "checkpoint files")


BEST_SPEC: dict[str, Check] = {
    "checkpoint": text(STEP_NAME),
    "step": integer(0),
    "val_nelbo": nullable(number()),
    "val_rows": nullable(integer(0)),
}


def check_best(obj: Any, where: str) -> dict:
    return check_object(obj, BEST_SPEC, ("checkpoint",), where, "the best checkpoint")


CLIP = list_of(number(0.0, 1.0))
STATE_SPEC: dict[str, Check] = {
    **{k: integer(0) for k in ("step", "epoch", "position", "rows_per_step", "ema_updates")},
    "world_size": integer(1),
    "seed": integer(),
    "data_hash": nullable(text()),
    "block_sampler": nullable(object_of(any_json)),
    "block_sizes": list_of(POSITIVE),
    "block_weights": list_of(number(0.0)),
    "clip_ranges": object_of(CLIP, key=text(re.compile(r"^\d+$"))),
    "clip_mode": text(choices=("auto", "fixed", "init")),
    "best": nullable(object_of(any_json)),
    "init_info": object_of(any_json),
}


def check_state(obj: Any, where: str) -> dict:
    """train_state/state.json: every field of TrainState, the clip ranges as [low, high]."""
    check_object(obj, STATE_SPEC, ("step",), where, "training state")
    for b, r in (obj.get("clip_ranges") or {}).items():
        if len(r) != 2 or not r[0] < r[1]:
            raise DidError(f"{where}: clip range of block size {b} must be [low, high] with low < high")
    best = obj.get("best")
    if best is not None:
        check_object(best, BEST_SPEC, ("step",), where + " 'best'", "the best evaluation")
    return obj


__all__ = [
    "check_object",
    "check_model_config",
    "check_run_config",
    "check_clip_tensors",
    "check_meta",
    "check_manifest",
    "check_best",
    "check_state",
    "safe_relative",
    "physical_memory",
    "kind",
    "MODEL_REQUIRED",
]
