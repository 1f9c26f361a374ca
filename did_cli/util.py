"""Small helpers every stage shares: error text, atomic files, devices, entropy."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from did_cli.errors import DidError, UsageError
from did_cli.io.outputs import write_bytes
from did_cli.io.terminal import say


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def one_line(e: BaseException, limit: int = 300) -> str:
    """The whole message of an exception on one line (whitespace collapsed), cut at `limit`
    characters with an ellipsis; for messages whose first line stops mid-sentence."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def os_reason(e: BaseException) -> str:
    """What went wrong in an OSError (its strerror), else the first line of the message."""
    return getattr(e, "strerror", None) or first_line(e)


def warn(msg: str) -> None:
    say(f"did: warning: {msg}")  # escaped: messages quote file names and record fields


def info(msg: str) -> None:
    say(f"did: {msg}")


def atomic_write(path: str | Path, data: Any, fsync: bool = False) -> None:
    """Write `data` to `path` so that nothing is lost (did_cli.io.outputs): a regular file is
    replaced via a temporary file of its own in the same folder and a rename, so a crash never
    leaves a half-written file under the real name, and the temporary file is removed on every
    failure; a symlink is followed; a device or pipe is written straight through. `data`: text,
    or anything with the buffer protocol (bytes, a uint8 numpy view). Raises DidError naming
    `path`."""
    write_bytes(path, data, fsync=fsync)


def to_json(obj: Any) -> str:
    """Indented JSON; dataclasses, paths and tuples are turned into plain values."""
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON as `atomic_write` does."""
    try:
        text = to_json(obj)
    except (TypeError, ValueError, RecursionError) as e:
        raise DidError(f"cannot write {path}: not JSON ({first_line(e)})") from None
    atomic_write(path, text)


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def finite(v: Any) -> float | None:
    """`v` as a float when it is a finite number, else None (strict JSON has no NaN or inf)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def finite_tree(obj: Any) -> Any:
    """`obj` with every non-finite float inside dicts and lists replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_tree(v) for v in obj]
    return obj


def fmt(v: Any, digits: int = 2) -> str:
    """A number for a table: '-' when missing or not finite, integers as they are, tiny floats in
    scientific notation (so a confidence of 3e-5 does not read 0.000)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-" if v is None or isinstance(v, (int, float)) else str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.2e}" if 0 < abs(v) < 10**-digits else f"{v:.{digits}f}"


def fmt_pct(v: float | None, missing: str = "-") -> str:
    """A relative change as a signed percentage ('+4.2%')."""
    return missing if v is None else f"{v * 100:+.1f}%"


def fmt_ci(ci: Any) -> str:
    """A 95% interval of a relative change (' [-6.6%, +4.7%]'), from a {"lo", "hi"} dict or a
    (lo, hi) pair; '' when there is none."""
    if isinstance(ci, dict):
        ci = (ci.get("lo"), ci.get("hi"))
    if not ci or finite(ci[0]) is None or finite(ci[1]) is None:
        return ""
    return f" [{ci[0] * 100:+.1f}%, {ci[1] * 100:+.1f}%]"


def resolve_device(name: Any, flag: str = "--device") -> Any:
    """'auto' (or None) -> cuda when available, else cpu; otherwise the named torch device,
    checked to exist here. Raises UsageError naming `flag`."""
    import torch

    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag} {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: CUDA is not available here")
    return dev


def unigram_entropy(tokens: Iterable[int]) -> float:
    """Entropy in nats of the empirical token-id distribution (0.0 when empty)."""
    counts = Counter(tokens)
    n = sum(counts.values())
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in counts.values())


def hub_unreachable() -> str | None:
    """A reason when the hub's host cannot even be resolved (saves minutes of retries)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return None  # offline mode: datasets answers from its local cache
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"hub not reachable: {e}"
    except Exception:
        return None
    return None
