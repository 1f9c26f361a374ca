"""Text sources for `did prepare`: files, folders, the bundled corpus, or a `datasets` hub name,
read into documents.

    `.txt` files (each file is ONE document), `.jsonl` (one JSON object with a "text" field per
    line), `.json` (a list of such objects, one object, or JSON lines), `.parquet` (a "text"
    column), any of these compressed as `.gz`, `.xz` or `.bz2`, folders of them (searched
    recursively, in sorted path order; other files are ignored), or a `datasets` hub name when
    the string is not an existing path and the hub is reachable (its "train" split, "text"
    column). No sources means the bundled corpus (Project Gutenberg books + Wikipedia intros).
    Text that is not valid UTF-8 is decoded with undecodable bytes replaced by U+FFFD, and a
    warning naming the file is printed once on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.errors import DidError, UsageError
from did_cli.io.bounded import decompress
from did_cli.io.jsonl import objects
from did_cli.util import first_line, hub_unreachable, warn

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus" / "corpus.jsonl.xz"
BUNDLED_NAME = "bundled:corpus.jsonl.xz"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSED = (".gz", ".xz", ".bz2")


@dataclass
class Source:
    label: str  # what meta.json and messages call it
    kind: str  # "txt" | "jsonl" | "json" | "parquet" | "hub"
    data: bytes | None = None  # decompressed file bytes
    dataset: Any = None  # a datasets.Dataset for hub sources

    def hash_into(self, h: Any) -> None:
        h.update(f"{self.kind}\0".encode())
        if self.data is not None:
            h.update(len(self.data).to_bytes(8, "little"))
            h.update(self.data)
        else:
            h.update(str(getattr(self.dataset, "_fingerprint", self.label)).encode())


def _file_kind(path: Path) -> tuple[str, Any] | None:
    """(kind, decompressor) for a supported file name, else None."""
    suffixes = [s.lower() for s in path.suffixes]
    decompress = None
    if suffixes and suffixes[-1] in COMPRESSED:
        decompress = suffixes[-1]
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in TEXT_SUFFIXES:
        return suffixes[-1][1:], decompress
    return None


def _read_file(path: Path, label: str) -> Source:
    kind = _file_kind(path)
    if kind is None:
        raise UsageError(
            f"{label}: unsupported file type (use .txt, .jsonl, .json or .parquet, optionally .gz/.xz/.bz2)"
        )
    try:
        raw = path.read_bytes()  # a regular file: as large as it is, no more
    except OSError as e:
        raise DidError(f"cannot read {label}: {e.strerror or e}") from None
    # bounded: a gzip bomb stops with one line instead of filling the memory
    return Source(label, kind[0], decompress(raw, kind[1], label) if kind[1] else raw)


def collect_sources(sources: list[str] | None) -> list[Source]:
    if not sources:
        return [_read_file(BUNDLED_CORPUS, BUNDLED_NAME)]
    out: list[Source] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files = sorted(
                f for f in p.rglob("*") if f.is_file() and _file_kind(f) and not f.name.startswith(".")
            )
            if not files:
                raise UsageError(f"source folder {s} holds no .txt/.jsonl/.json/.parquet files")
            out += [_read_file(f, str(f)) for f in files]
        elif p.is_file():
            out.append(_read_file(p, s))
        elif p.exists():  # a FIFO or device would block or never end
            raise UsageError(f"source {s} is not a regular file or folder")
        elif _file_kind(p) or s.startswith((".", "/", "~")) or s.count("/") >= 2:
            raise UsageError(f"source {s} does not exist")
        else:
            out.append(_hub_source(s))
    return out


def _hub_source(name: str) -> Source:
    reason = hub_unreachable()
    if reason:
        raise UsageError(
            f"source {name!r} is neither an existing file/folder nor a reachable dataset ({reason})"
        )
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train", **no_remote_code(datasets.load_dataset))
    except Exception as e:  # offline, unknown name, bad config...
        reason = first_line(e)
        raise UsageError(
            f"source {name!r} is neither an existing file/folder nor a reachable dataset ({reason})"
        ) from None
    if "text" not in ds.column_names:
        raise DidError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return Source(name, "hub", dataset=ds)


def no_remote_code(loader: Any) -> dict:
    """`trust_remote_code=False` for a loader that still takes it (datasets < 4 ran a
    dataset's loading script when told to; later versions run none and dropped the option)."""
    import inspect

    try:
        takes = "trust_remote_code" in inspect.signature(loader).parameters
    except (TypeError, ValueError):
        takes = False
    return {"trust_remote_code": False} if takes else {}


def _decode(src: Source) -> str:
    assert src.data is not None
    try:
        return src.data.decode("utf-8")
    except UnicodeDecodeError:
        warn(f"{src.label} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
        return src.data.decode("utf-8", errors="replace")


def _text_of(obj: Any, where: str) -> str:
    if not isinstance(obj, dict) or "text" not in obj:
        raise DidError(f'{where}: expected a JSON object with a "text" field')
    t = obj["text"]
    if t is None:
        return ""
    if not isinstance(t, str):
        raise DidError(f'{where}: "text" is not a string')
    return t


def _jsonl_docs(text: str, label: str) -> Iterator[str]:
    for n, obj in objects(text.splitlines(), label, "a document"):
        yield _text_of(obj, f"line {n} of {label}")


def documents(src: Source) -> Iterator[str]:
    """The documents of one source (possibly empty strings; the caller drops blank ones)."""
    if src.kind == "hub":
        yield from (t or "" for t in src.dataset["text"])
    elif src.kind == "txt":
        yield _decode(src)
    elif src.kind == "jsonl":
        yield from _jsonl_docs(_decode(src), src.label)
    elif src.kind == "json":
        text = _decode(src)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            yield from _jsonl_docs(text, src.label)  # JSON lines saved as .json
            return
        except RecursionError:
            raise DidError(f"{src.label}: JSON nested too deeply") from None
        except ValueError as e:  # an integer literal longer than Python converts
            raise DidError(
                f"{src.label}: a number too long to be read ({' '.join(str(e).split())[:80]})"
            ) from None
        items = obj if isinstance(obj, list) else [obj]
        for i, item in enumerate(items):
            yield _text_of(item, f"{src.label}[{i}]")
    elif src.kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(src.data))
        except Exception as e:
            raise DidError(f"cannot read parquet file {src.label}: {e}") from None
        if "text" not in table.column_names:
            raise DidError(f"{src.label}: no 'text' column (columns: {', '.join(table.column_names)})")
        yield from (t or "" for t in table.column("text").to_pylist())
