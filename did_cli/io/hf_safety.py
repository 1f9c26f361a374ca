"""Loading with transformers without running anything the user did not ask for, and failing at
once when a model or tokenizer cannot be found offline.

- `refuse_remote_code(folder, what)`: a folder whose `config.json` or `tokenizer_config.json`
  carries an `auto_map` wants transformers to import Python shipped in the folder; it is refused
  in one line naming the folder, before transformers is even imported.
- `from_pretrained(auto_class, source, what, ...)`: `transformers.<auto_class>.from_pretrained`
  with `trust_remote_code=False`, the folder check above, and stdin replaced by an empty stream,
  so that no prompt ("Do you wish to run the custom code? [y/N]") can read an answer.
- `looks_like_path(name)`, `hub_offline()`, `cached_snapshot(name)`: what a name that is not
  a local file or folder can still be, decided without a single network retry.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from did_cli.errors import DidError

REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")
MAX_CONFIG_BYTES = 16 << 20  # a config larger than this is not a config
PATH_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth")
HUB_LOGGERS = ("huggingface_hub", "transformers", "urllib3", "filelock")


def _auto_map_file(folder: Path) -> str | None:
    """The name of the first file of `folder` that asks for remote code, else None."""
    for name in REMOTE_CODE_FILES:
        path = folder / name
        try:
            if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
                continue
            raw = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError, RecursionError):
            continue  # unreadable: transformers will fail on it, and never reach its code
        if isinstance(raw, dict) and raw.get("auto_map"):
            return name
    return None


def refuse_remote_code(folder: str | Path, what: str) -> None:
    """Raise DidError when `folder` asks transformers to import code it ships (an `auto_map`).

    `what` names the role in the message, e.g. "scorer" or "tokenizer"."""
    folder = Path(folder)
    found = _auto_map_file(folder)
    if found is not None:
        raise DidError(
            f"{what} {folder}: its {found} asks to run Python code shipped in the folder (auto_map); "
            "did never runs such code: use a model that transformers supports natively"
        )


@contextlib.contextmanager
def no_stdin() -> Iterator[None]:
    """stdin reads as empty inside the block: a library prompt gets EOF, never the user's input
    (which may be records piped in, or a 'y')."""
    saved = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        yield
    finally:
        sys.stdin = saved


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """The hub client's and transformers' retry and advisory logging, and their progress bars,
    kept off stderr for one call (errors still come as exceptions)."""
    old = {n: logging.getLogger(n).level for n in HUB_LOGGERS}
    for n in HUB_LOGGERS:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # a GGUF conversion draws a per-tensor progress bar that no setting turns off
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def from_pretrained(auto_class: str, source: str | Path, what: str, check: bool = True, **kw: Any) -> Any:
    """`transformers.<auto_class>.from_pretrained(source, trust_remote_code=False, **kw)`.

    A local folder asking for remote code is refused first (`check`; a hub name is checked in
    its cached snapshot, when there is one); stdin is unreadable and hub logging silent during
    the call. Exceptions of transformers pass through for the caller to word."""
    folder = Path(source).expanduser()
    if check:
        if folder.is_dir():
            refuse_remote_code(folder, what)
        elif not folder.exists():
            cached = cached_snapshot(str(source))
            if cached is not None:
                refuse_remote_code(cached, what)
    import transformers

    loader = getattr(transformers, auto_class)
    kw["trust_remote_code"] = False
    with no_stdin(), quiet_hub():
        return loader.from_pretrained(str(folder) if folder.exists() else str(source), **kw)


def looks_like_path(name: str) -> bool:
    """Whether `name` can only mean a file or folder, never a hub name ("name" or "org/name"):
    it starts with '.', '/' or '~', has two or more '/', a backslash, a file suffix such as
    '.gguf', or its first part is an existing folder ("models/gpt2-large" when models/ exists)."""
    if not name:
        return False
    if name.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name:
        return True
    if name.lower().endswith(PATH_SUFFIXES):
        return True
    head = name.split("/", 1)[0]
    return "/" in name and Path(head).is_dir()


def hub_offline() -> str | None:
    """Why the hub cannot be asked now (offline mode set, or its host unknown), else None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    from did_cli.util import hub_unreachable

    return hub_unreachable()


def cached_snapshot(name: str) -> Path | None:
    """The folder of hub model `name` in the local Hugging Face cache (holding its config.json),
    else None. Never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - a name the hub client rejects is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None
