"""`did prepare`: read text -> tokenise -> pack into fixed-length rows -> memory-mapped files.

Sources
    `.txt` files (each file is ONE document), `.jsonl` (one JSON object with a "text" field per
    line), `.json` (a list of such objects, one object, or JSON lines), `.parquet` (a "text"
    column), any of these compressed as `.gz`, `.xz` or `.bz2`, folders of them (searched
    recursively, in sorted path order; other files are ignored), or a `datasets` hub name when
    the string is not an existing path and the hub is reachable (its "train" split, "text"
    column). No sources means the bundled corpus (Project Gutenberg books + Wikipedia intros).
    Text that is not valid UTF-8 is decoded with undecodable bytes replaced by U+FFFD, and a
    warning naming the file is printed once on stderr.

Row layout
    Each split is its own token stream: every document followed by EOS, documents in source
    order. Row r holds BOS followed by stream tokens [r*(L-1), (r+1)*(L-1)), so position 0 of
    every row is BOS (never masked; sampling also starts from BOS) and a row has L = seq_len
    tokens. The last partial row is dropped. For GPT-2, BOS = EOS = 50256.

Validation split
    By documents: `val_docs=N` holds out the last N documents, `val_fraction=F` (default 0.05
    when neither is given) the last round(F * docs). 0 means no validation split.

Output folder
    `train.bin`, `validation.bin`: raw little-endian uint16 (uint32 when the model vocabulary
    exceeds 65536), shape [rows, seq_len]; `meta.json` (format "did.prepared/1") describing them.
    Files are written under temporary names and renamed, meta.json last, so a folder with a
    meta.json is complete. Re-running with the same source bytes and settings reuses it.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from did_cli.errors import DidError, UsageError

FORMAT = "did.prepared/1"
SPLITS = ("train", "validation")
BUNDLED_CORPUS = Path(__file__).resolve().parent / "assets" / "corpus" / "corpus.jsonl.xz"
BUNDLED_NAME = "bundled:corpus.jsonl.xz"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSED = {".gz": gzip.decompress, ".xz": lzma.decompress, ".bz2": bz2.decompress}
DEFAULT_VAL_FRACTION = 0.05


def _warn(msg: str) -> None:
    print(f"did: warning: {msg}", file=sys.stderr)


def _info(msg: str) -> None:
    print(f"did: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------- sources


@dataclass
class _Source:
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
        decompress = COMPRESSED[suffixes[-1]]
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in TEXT_SUFFIXES:
        return suffixes[-1][1:], decompress
    return None


def _read_file(path: Path, label: str) -> _Source:
    kind = _file_kind(path)
    if kind is None:
        raise UsageError(f"{label}: unsupported file type (use .txt, .jsonl, .json or .parquet, optionally .gz/.xz/.bz2)")
    try:
        raw = path.read_bytes()
        data = kind[1](raw) if kind[1] else raw
    except OSError as e:
        raise DidError(f"cannot read {label}: {e.strerror or e}") from None
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, ValueError) as e:
        raise DidError(f"cannot decompress {label}: {e}") from None
    return _Source(label, kind[0], data)


def _collect(sources: list[str] | None) -> list[_Source]:
    if not sources:
        return [_read_file(BUNDLED_CORPUS, BUNDLED_NAME)]
    out: list[_Source] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _file_kind(f) and not f.name.startswith("."))
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


def _hub_unreachable() -> str | None:
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


def _hub_source(name: str) -> _Source:
    reason = _hub_unreachable()
    if reason:
        raise UsageError(f"source {name!r} is neither an existing file/folder nor a reachable dataset ({reason})")
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, bad config...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"source {name!r} is neither an existing file/folder nor a reachable dataset ({reason})") from None
    if "text" not in ds.column_names:
        raise DidError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return _Source(name, "hub", dataset=ds)


def _decode(src: _Source) -> str:
    assert src.data is not None
    try:
        return src.data.decode("utf-8")
    except UnicodeDecodeError:
        _warn(f"{src.label} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
        return src.data.decode("utf-8", errors="replace")


def _text_of(obj: Any, where: str) -> str:
    if not isinstance(obj, dict) or "text" not in obj:
        raise DidError(f"{where}: expected a JSON object with a \"text\" field")
    t = obj["text"]
    if t is None:
        return ""
    if not isinstance(t, str):
        raise DidError(f"{where}: \"text\" is not a string")
    return t


def _jsonl_docs(text: str, label: str) -> Iterator[str]:
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DidError(f"{label}:{n}: not valid JSON ({e.msg})") from None
            yield _text_of(obj, f"{label}:{n}")


def _documents(src: _Source) -> Iterator[str]:
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


# ------------------------------------------------------------------------------ tokenising

_worker_tok = None


def _worker_init(name: str) -> None:
    global _worker_tok
    # each worker is one process; let it use one core so num_proc means what it says
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from did_cli.tokenizer import load_tokenizer

    _worker_tok = load_tokenizer(name)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in _worker_tok.encode_batch(texts)]


def _chunks(docs: list[str], max_chars: int = 1 << 20, max_docs: int = 512) -> list[list[str]]:
    out, cur, n = [], [], 0
    for d in docs:
        cur.append(d)
        n += len(d)
        if n >= max_chars or len(cur) >= max_docs:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def _tokenize(docs: list[str], tok: Any, num_proc: int, progress: bool) -> list[np.ndarray]:
    """Token ids of every document, in order. num_proc > 1 uses that many worker processes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    chunks = _chunks(docs)
    console = Console(stderr=True)
    # a bar that cannot redraw (logs, pipes) would only leave blank lines behind
    bar = Progress(
        TextColumn("tokenising"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"), TimeRemainingColumn(),
        console=console, transient=True, disable=not (progress and console.is_terminal),
    )
    out: list[np.ndarray] = []
    with bar:
        task = bar.add_task("tokenise", total=len(docs))
        if num_proc <= 1:
            for c in chunks:
                out += [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(c)]
                bar.advance(task, len(c))
        else:
            # spawn, not fork: the Rust tokenizer's thread pool does not survive a fork
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(num_proc, initializer=_worker_init, initargs=(tok.name,)) as pool:
                for c, ids in zip(chunks, pool.imap(_encode_chunk, chunks)):
                    out += ids
                    bar.advance(task, len(c))
    return out


# --------------------------------------------------------------------------------- packing


def _pack(doc_ids: list[np.ndarray], seq_len: int, bos: int, eos: int, dtype: np.dtype) -> np.ndarray:
    """Rows [N, seq_len]: BOS then the next seq_len-1 tokens of the doc+EOS stream."""
    if not doc_ids:
        return np.empty((0, seq_len), dtype=dtype)
    sep = np.array([eos], dtype=np.int64)
    stream = np.concatenate([part for ids in doc_ids for part in (ids, sep)])
    body = seq_len - 1
    n = len(stream) // body
    rows = np.empty((n, seq_len), dtype=dtype)
    rows[:, 0] = bos
    rows[:, 1:] = stream[: n * body].reshape(n, body)
    return rows


def _write_atomic(path: Path, data: bytes | np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            # f.write (not ndarray.tofile) so a full disk reports its errno
            f.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DidError(f"cannot write {path}: {e.strerror or e}") from None


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


# ------------------------------------------------------------------------------- prepare


def prepare(
    sources: list[str] | None,
    out: str | Path,
    seq_len: int = 1024,
    tokenizer: str = "gpt2",
    val_docs: int | None = None,
    val_fraction: float | None = None,
    num_proc: int = 1,
    progress: bool = True,
) -> dict:
    """Tokenise `sources` (None = the bundled corpus) into rows of `seq_len` tokens under `out`.

    See the module docstring for sources, row layout and output files. Returns the meta dict
    written to `out/meta.json`, plus `"reused": True/False` (not stored) saying whether an
    identical earlier result was kept.
    """
    from did_cli.tokenizer import load_tokenizer

    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len}: must be at least 2 (BOS plus one token)")
    if val_docs is not None and val_fraction is not None:
        raise UsageError("--val-docs and --val-fraction are mutually exclusive; give one of them")
    if val_docs is not None and val_docs < 0:
        raise UsageError(f"--val-docs {val_docs}: must be >= 0")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if num_proc < 1:
        raise UsageError(f"--num-proc {num_proc}: must be >= 1")
    if val_docs is None and val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    tok = load_tokenizer(tokenizer)
    srcs = _collect(sources)

    h = hashlib.sha256()
    settings = dict(format=FORMAT, tokenizer=tok.name, fingerprint=tok.fingerprint, seq_len=seq_len,
                    val_docs=val_docs, val_fraction=val_fraction)
    h.update(json.dumps(settings, sort_keys=True).encode())
    for s in srcs:
        s.hash_into(h)
    content_hash = h.hexdigest()[:32]

    old = _reusable(out, content_hash)
    if old is not None:
        _info(f"reusing prepared data in {out} (same sources and settings)")
        return {**old, "reused": True}

    docs = [d for s in srcs for d in _documents(s) if d.strip()]
    if not docs:
        raise DidError(f"no text found in {', '.join(s.label for s in srcs)}")
    n_val = val_docs if val_docs is not None else int(round(val_fraction * len(docs)))
    if n_val >= len(docs):
        raise UsageError(f"validation takes {n_val} of {len(docs)} documents, leaving none to train on; "
                         "use a smaller --val-docs or --val-fraction")

    ids = _tokenize(docs, tok, num_proc, progress)
    dtype = _dtype_for(tok.vocab_size)
    parts = {"train": ids[: len(ids) - n_val], "validation": ids[len(ids) - n_val:]}
    rows, splits = {}, {}
    for name, part in parts.items():
        rows[name] = _pack(part, seq_len, tok.bos_id, tok.eos_id, dtype)
        tokens = int(sum(len(x) + 1 for x in part))
        if len(rows[name]) == 0 and part:
            flag = "--seq-len" if name == "train" else "--seq-len or a larger --val-fraction/--val-docs"
            raise UsageError(f"the {name} split ({len(part)} documents, {tokens} tokens) is too small for one row of "
                             f"{seq_len} tokens; use a smaller {flag}")
        splits[name] = {"rows": int(len(rows[name])), "docs": len(part), "tokens": tokens}

    meta = {
        "format": FORMAT,
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "mask_id": tok.mask_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "layout": "row = [BOS] + next seq_len-1 tokens of the stream; stream = each document followed by EOS",
        "splits": splits,
        "sources": [s.label for s in srcs],
        "val_docs": val_docs,
        "val_fraction": val_fraction,
        "content_hash": content_hash,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DidError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    (out / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until meta.json is back
    for name in SPLITS:
        _write_atomic(out / f"{name}.bin", rows[name])
    _write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return {**meta, "reused": False}


def _reusable(out: Path, content_hash: str) -> dict | None:
    try:
        data = PreparedData(out)
    except DidError:
        return None
    if data.meta.get("content_hash") != content_hash:
        return None
    try:
        for name in SPLITS:
            data.rows(name)  # checks the file sizes
    except DidError:
        return None
    return data.meta


# ------------------------------------------------------------------------------ reading


class PreparedData:
    """A folder written by `prepare`: `rows(split)` memory-maps [N, seq_len] token rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DidError(f"{self.path} is not prepared data (no meta.json); run `did prepare --out {self.path}`")
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DidError(f"cannot read {meta_path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DidError(f"{meta_path}: unknown format (expected {FORMAT!r}); re-run `did prepare`")
        for key in ("seq_len", "vocab_size", "dtype", "splits", "tokenizer"):
            if key not in meta:
                raise DidError(f"{meta_path}: missing {key!r}; re-run `did prepare`")
        self.meta: dict = meta
        self.seq_len: int = int(meta["seq_len"])

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v['rows']} rows" for k, v in self.meta["splits"].items())
        return f"PreparedData({str(self.path)!r}, seq_len={self.seq_len}, {counts})"

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def rows(self, split: str = "train") -> np.ndarray:
        """Read-only memory map of shape [rows, seq_len] (uint16 or uint32)."""
        splits = self.meta["splits"]
        if split not in splits:
            raise DidError(f"{self.path} has no {split!r} split (has: {', '.join(splits)})")
        n = int(splits[split]["rows"])
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        f = self.path / f"{split}.bin"
        expected = n * self.seq_len * dtype.itemsize
        size = f.stat().st_size if f.is_file() else -1
        if size != expected:
            raise DidError(f"{f}: expected {expected} bytes for {n} rows of {self.seq_len}, found "
                           f"{'no file' if size < 0 else size}; re-run `did prepare`")
        if n == 0:
            return np.empty((0, self.seq_len), dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r", shape=(n, self.seq_len))

    def check_compatible(self, *, tokenizer: str, vocab_size: int, seq_len: int | None = None) -> None:
        """Raise DidError naming the mismatch if a model with these settings cannot use this data."""
        from did_cli.tokenizer import canonical_name

        mine = canonical_name(self.meta["tokenizer"])
        if canonical_name(tokenizer) != mine and not _same_folder(tokenizer, mine):
            raise DidError(f"data in {self.path} was tokenised with {mine!r} but the model uses {tokenizer!r}; "
                           f"re-run `did prepare --tokenizer {tokenizer}`")
        if int(vocab_size) != self.vocab_size:
            raise DidError(f"data in {self.path} has vocab_size {self.vocab_size} (incl. [MASK]) but the model has "
                           f"{vocab_size}")
        if seq_len is not None and int(seq_len) != self.seq_len:
            raise DidError(f"data in {self.path} has rows of {self.seq_len} tokens but the model length is {seq_len}; "
                           f"re-run `did prepare --seq-len {seq_len}`")


def _same_folder(a: str, b: str) -> bool:
    """Two spellings of one tokenizer folder (relative vs absolute) are the same tokenizer."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
