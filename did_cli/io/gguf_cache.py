"""The tokenizer of a GGUF file, converted once and kept in a cache folder.

transformers reads a GGUF tokenizer with `AutoTokenizer.from_pretrained(folder, gguf_file=name)`,
which rebuilds it from the file's metadata (seconds for SmolLM2's 49,152 tokens, minutes for a
large vocabulary on a busy CPU). The result is saved with `save_pretrained` under
`$XDG_CACHE_HOME/did/tokenizers/<sha256 of the file>` (else `~/.cache/did/...`), and later
loads read that folder. A folder is complete once it exists: it is written under a temporary
name and renamed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from did_cli.errors import DidError
from did_cli.io.hf_safety import from_pretrained
from did_cli.util import info, one_line, warn

MARKER = "did-gguf-source.json"


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/did`, else `~/.cache/did`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "did"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (hashed once per process while its size and mtime stay)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime)


def tokenizer_cache_folder(path: str | Path) -> Path:
    """Where the converted tokenizer of GGUF file `path` is kept (it may not exist yet)."""
    return cache_root() / "tokenizers" / file_sha256(path)[:32]


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The transformers tokenizer of a GGUF file: from the cache, or converted and cached.
    An unwritable cache only costs the conversion next time (a warning says so)."""
    p = Path(path).expanduser().resolve()
    try:
        folder = tokenizer_cache_folder(p)
    except OSError as e:
        raise DidError(f"cannot read {p}: {e.strerror or e}") from None
    if (folder / MARKER).is_file():
        try:
            return from_pretrained("AutoTokenizer", folder, f"the cached tokenizer {folder}")
        except Exception as e:  # noqa: BLE001 - a damaged cache entry: convert again
            warn(f"cached tokenizer {folder} unreadable ({one_line(e)}); converting {p.name} again")
            shutil.rmtree(folder, ignore_errors=True)
    info(f"reading the tokenizer of {p.name} (once; cached in {folder})")
    try:
        hf = from_pretrained("AutoTokenizer", p.parent, f"the tokenizer of {p}", gguf_file=p.name)
    except Exception as e:  # noqa: BLE001 - gguf missing, a file that is not GGUF, no tokenizer in it
        raise DidError(f"cannot read a tokenizer from {p}: {one_line(e)}") from None
    _store(hf, p, folder)
    return hf


def _store(hf: Any, source: Path, folder: Path) -> None:
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"source": str(source), "sha256": folder.name}) + "\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / MARKER).is_file():  # not another process's finished copy
                raise
    except OSError as e:
        warn(
            f"cannot cache the tokenizer of {source.name} in {folder} ({e.strerror or e}); it is "
            "converted again next time"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
