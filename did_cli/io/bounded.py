"""Bounded readers for every file and stream a user names: a size, line-length, expansion or
depth limit on each, so that `/dev/zero`, `/dev/urandom`, an endless stdin, a YAML alias bomb or
a gzip bomb is one line naming the flag or file instead of a MemoryError; and text decoded as
UTF-8 whatever the locale or PYTHONIOENCODING says.

    read_json(path, "config.json")            # a small JSON file of ours, checked JSON integers
    for no, line in lines(src, "--prompts", LINE_LIMIT): ...   # '-' = stdin
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from did_cli.errors import DidError
from did_cli.io.jsonl import decode
from did_cli.io.targets import reason, stdin_bytes

MiB = 1 << 20
SMALL_FILE = 16 * MiB
"""config.json, meta.json, manifest.json, best.json, state.json, --config: settings, not data."""
LINE_LIMIT = 64 * MiB
"""One JSONL line (a record of a very long sample holds its tokens and confidences)."""
SCORES_FILE = 256 * MiB
"""`did show --scores`: the JSON of `did eval-ppl --json` (per-sample rows)."""
YAML_NODES = 100_000
"""Values a YAML config may hold once its aliases are expanded."""
BOMB_FLOOR = 256 * MiB
BOMB_RATIO = 100
"""A compressed source may expand to max(BOMB_FLOOR, BOMB_RATIO x its size); text compresses
about 3-10x, a decompression bomb about 1000x."""


def size_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def _open(path: str | Path, where: str, error: type[DidError]) -> tuple[BinaryIO, bool]:
    if str(path) == "-":
        return stdin_bytes(), False
    p = Path(path)
    if p.is_dir():
        raise error(f"{where}: is a directory, not a file")
    try:
        return open(p, "rb"), True
    except OSError as e:
        raise error(f"cannot read {where}: {reason(e)}") from None


def read_bytes(
    path: str | Path, where: str, limit: int, error: type[DidError] = DidError, what: str = "this file"
) -> bytes:
    """At most `limit` bytes of a file (or stdin, '-'); more is an error naming `where` and
    saying what the file should have been (`what`)."""
    f, close = _open(path, where, error)
    try:
        data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {where}: {reason(e)}") from None
    finally:
        if close:
            f.close()
    if len(data) > limit:
        raise error(f"{where}: more than {size_text(limit)}, too large for {what} (is it the right file?)")
    return data


def text_of(data: bytes, where: str, error: type[DidError] = DidError) -> str:
    """UTF-8 text (a leading byte-order mark dropped); undecodable bytes are an error naming
    where they are."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(
    path: str | Path,
    what: str | None = None,
    limit: int = SMALL_FILE,
    error: type[DidError] = DidError,
    kind: str = "a settings file",
) -> Any:
    """The JSON value of a file, read within `limit` bytes; integers longer than JSON numbers
    of ours can be are refused before conversion, nesting too deep is refused. `what` names
    the file in messages (default: its path), `kind` says what it should be."""
    where = what or str(path)
    text = text_of(read_bytes(path, where, limit, error, kind), where, error)
    try:
        return decode(text, f"{where}: ", kind)
    except DidError as e:
        raise error(str(e)) from None


def lines(
    source: str | Path | Any, name: str, limit: int = LINE_LIMIT, error: type[DidError] = DidError
) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of a file, '-' (stdin) or an open stream, each line decoded
    as UTF-8 and at most `limit` bytes (an endless line, `/dev/zero`, is an error naming it)."""
    if isinstance(source, (str, Path)):
        f, close = _open(source, name, error)
    else:
        f, close = getattr(source, "buffer", source), False
    offset, no = 0, 0
    try:
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            no += 1
            if isinstance(raw, str):  # a text stream handed in by a caller
                raw = raw.encode("utf-8", "surrogateescape")
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise error(f"line {no} of {name}: longer than {size_text(limit)} (no line end)")
            try:
                text = raw.decode("utf-8-sig" if no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{name}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from None
            offset += len(raw)
            yield no, text
    except OSError as e:
        raise error(f"cannot read {name}: {reason(e)}") from None
    finally:
        if close:
            f.close()


# ------------------------------------------------------------------------------------ YAML


def load_yaml(text: str, where: str, error: type[DidError] = DidError) -> Any:
    """`yaml.safe_load` of `text`, after checking that its aliases do not expand past
    YAML_NODES values (a 'billion laughs' file is a few lines long)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise error(f"{where}: YAML nested too deeply") from None
    if node is not None:
        _count_nodes(node, where, error)
    return yaml.safe_load(text)


def _count_nodes(root: Any, where: str, error: type[DidError]) -> None:
    import yaml

    seen, stack = 0, [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > YAML_NODES:
            raise error(
                f"{where}: more than {YAML_NODES} values once its aliases are expanded (a YAML alias bomb?)"
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((k, v))


# ---------------------------------------------------------------------------- decompression


def _decompressor(kind: str) -> Any:
    return {
        ".gz": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
        ".xz": lzma.LZMADecompressor,
        ".bz2": bz2.BZ2Decompressor,
    }[kind]()


def decompress(raw: bytes, kind: str, label: str) -> bytes:
    """The bytes of a `.gz`, `.xz` or `.bz2` file (several concatenated members included),
    stopped with an error naming `label` once they pass max(BOMB_FLOOR, BOMB_RATIO x its size)."""
    limit = max(BOMB_FLOOR, BOMB_RATIO * len(raw))
    out = bytearray()
    rest = raw
    try:
        while rest:
            d = _decompressor(kind)
            data = rest
            while not d.eof:
                room = limit + 1 - len(out)
                chunk = d.decompress(data, room) if kind == ".gz" else d.decompress(data, max_length=room)
                out += chunk
                if len(out) > limit:
                    raise DidError(
                        f"cannot decompress {label}: it expands past {size_text(limit)} (more than "
                        f"{BOMB_RATIO} times its {size_text(len(raw))}: a decompression bomb?); decompress "
                        "it yourself if it is real text"
                    )
                data = getattr(d, "unconsumed_tail", b"")  # zlib hands back what it did not read
                if not chunk and not data and (kind == ".gz" or d.needs_input):
                    raise DidError(f"cannot decompress {label}: the file ends mid-stream")
            rest = d.unused_data.lstrip(b"\0") if kind == ".gz" else d.unused_data
    except (EOFError, lzma.LZMAError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise DidError(f"cannot decompress {label}: {e}") from None
    return bytes(out)


__all__ = [
    "SMALL_FILE",
    "LINE_LIMIT",
    "SCORES_FILE",
    "YAML_NODES",
    "read_bytes",
    "read_json",
    "text_of",
    "lines",
    "load_yaml",
    "decompress",
    "size_text",
]
