"""`did prepare`: read text -> tokenise -> pack into fixed-length rows -> memory-mapped files
(read back by did_cli.io.data.PreparedData).

Sources
    Files, folders, the bundled corpus or a `datasets` hub name: `did_cli.io.sources`.

Row layout
    Each split is its own token stream: every document followed by EOS, documents in source
    order. `layout="bos"` (the default): row r holds BOS followed by stream tokens
    [r*(L-1), (r+1)*(L-1)), so position 0 of every row is BOS (never masked; sampling also starts
    from BOS). `layout="raw"` (BD3-LM's OpenWebText rows): row r is the raw window
    [r*L, (r+1)*L) of the stream, no BOS; position 0 is whatever token falls there, and
    training and evaluation treat it as BD3-LM does: never masked, never counted. A row has
    L = seq_len tokens; the last partial row is dropped. For GPT-2, BOS = EOS = 50256.

Validation split
    By documents: `val_docs=N` holds out the last N documents, `val_fraction=F` (default 0.05
    when neither is given) the last round(F * docs). 0 means no validation split.

Output folder
    `train.bin`, `validation.bin`: raw little-endian uint16 (uint32 when the model vocabulary
    exceeds 65536), shape [rows, seq_len]; `meta.json` (format "did.prepared/1") describing them.
    The files are built whole in a staging folder and swapped in only when complete, meta.json
    last, so a folder with a meta.json is complete (did_cli.io.prepared_folder, which also locks
    the folder and cleans what a killed run left). Re-running with the same source bytes and
    settings reuses it; other settings or sources in a non-empty folder are refused unless
    `force` (`--force`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np

from did_cli.errors import DidError, UsageError
from did_cli.io import prepared_folder
from did_cli.io.data import FORMAT
from did_cli.io.sources import collect_sources, documents
from did_cli.io.terminal import Ticker
from did_cli.util import info

DEFAULT_VAL_FRACTION = 0.05


# ------------------------------------------------------------------------------ tokenising

_worker_tok = None


def _worker_init(name: str) -> None:
    global _worker_tok
    # each worker is one process; let it use one core so num_proc means what it says
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from did_cli.io.tokenizer import load_tokenizer

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
        TextColumn("tokenising"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (progress and console.is_terminal),
    )
    # in logs and pipes, plain lines with an estimate instead
    lines = Ticker("did prepare: tokenising", len(docs), "docs") if progress and bar.disable else None
    out: list[np.ndarray] = []
    with bar:
        task = bar.add_task("tokenise", total=len(docs))
        if num_proc <= 1:
            for c in chunks:
                out += [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(c)]
                bar.advance(task, len(c))
                if lines:
                    lines.advance(len(c))
        else:
            # spawn, not fork: the Rust tokenizer's thread pool does not survive a fork
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(num_proc, initializer=_worker_init, initargs=(tok.name,)) as pool:
                for c, ids in zip(chunks, pool.imap(_encode_chunk, chunks)):
                    out += ids
                    bar.advance(task, len(c))
                    if lines:
                        lines.advance(len(c))
    return out


# --------------------------------------------------------------------------------- packing


LAYOUTS = {
    "bos": "row = [BOS] + next seq_len-1 tokens of the stream; stream = each document followed by EOS",
    "raw": "row = next seq_len tokens of the stream (no BOS; BD3-LM's OpenWebText rows); stream = each "
    "document followed by EOS",
}


def _pack(
    doc_ids: list[np.ndarray], seq_len: int, bos: int, eos: int, dtype: np.dtype, layout: str = "bos"
) -> np.ndarray:
    """Rows [N, seq_len] of the doc+EOS stream: BOS then its next seq_len-1 tokens ("bos"), or
    its next seq_len tokens ("raw")."""
    if not doc_ids:
        return np.empty((0, seq_len), dtype=dtype)
    sep = np.array([eos], dtype=np.int64)
    stream = np.concatenate([part for ids in doc_ids for part in (ids, sep)])
    if layout == "raw":
        n = len(stream) // seq_len
        return stream[: n * seq_len].reshape(n, seq_len).astype(dtype)
    body = seq_len - 1
    n = len(stream) // body
    rows = np.empty((n, seq_len), dtype=dtype)
    rows[:, 0] = bos
    rows[:, 1:] = stream[: n * body].reshape(n, body)
    return rows


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
    layout: str = "bos",
    force: bool = False,
) -> dict:
    """Tokenise `sources` (None = the bundled corpus) into rows of `seq_len` tokens under `out`.

    See the module docstring for sources, row layout and output files. Returns the meta dict
    written to `out/meta.json`, plus `"reused": True/False` (not stored) saying whether an
    identical earlier result was kept. A non-empty `out` that is not this preparation (other
    prepared data, or files of the user's) is refused unless `force`.
    """
    from did_cli.io.tokenizer import load_tokenizer

    val_fraction = _check_settings(seq_len, val_docs, val_fraction, num_proc)
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r}: choose from {', '.join(LAYOUTS)}")

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    tok = load_tokenizer(tokenizer)
    srcs = collect_sources(sources)

    content_hash = _content_hash(srcs, tok, seq_len, val_docs, val_fraction, layout)
    with prepared_folder.hold(out) as cleaned:
        if cleaned:
            info(f"removed what an interrupted `did prepare` left in {out}: {', '.join(cleaned)}")
        old = prepared_folder.reusable(out, content_hash)
        if old is not None:
            info(f"reusing prepared data in {out} (same sources and settings)")
            return {**old, "reused": True}
        if not force:
            prepared_folder.refuse_other(
                out,
                {
                    "sources": [x.label for x in srcs],
                    "seq_len": seq_len,
                    "tokenizer": tok.name,
                    "row_layout": layout,
                    "val_docs": val_docs,
                    "val_fraction": val_fraction,
                },
            )
        meta = _build(srcs, tok, seq_len, val_docs, val_fraction, num_proc, progress, layout)
        meta["content_hash"] = content_hash
        prepared_folder.write(out, meta.pop("rows"), meta)
    return {**meta, "reused": False}


def _build(srcs, tok, seq_len, val_docs, val_fraction, num_proc, progress, layout) -> dict:
    """Documents -> rows of each split, and the meta.json that describes them (rows under 'rows')."""
    docs = [d for s in srcs for d in documents(s) if d.strip()]
    if not docs:
        raise DidError(f"no text found in {', '.join(s.label for s in srcs)}")
    n_val = val_docs if val_docs is not None else int(round(val_fraction * len(docs)))
    if n_val >= len(docs):
        raise UsageError(
            f"validation takes {n_val} of {len(docs)} documents, leaving none to train on; "
            "use a smaller --val-docs or --val-fraction"
        )

    dtype = _dtype_for(tok.vocab_size)
    rows, splits = _split_rows(_tokenize(docs, tok, num_proc, progress), n_val, seq_len, tok, dtype, layout)
    return {
        "format": FORMAT,
        **_tokenizer_meta(tok),
        "seq_len": seq_len,
        "dtype": dtype.name,
        "layout": LAYOUTS[layout],
        "row_layout": layout,
        "splits": splits,
        "sources": [s.label for s in srcs],
        "val_docs": val_docs,
        "val_fraction": val_fraction,
        "rows": rows,
    }


def _content_hash(
    srcs: list, tok: Any, seq_len: int, val_docs: int | None, val_fraction: float | None, layout: str
) -> str:
    """What decides the rows: the source bytes, the tokenizer and the settings."""
    h = hashlib.sha256()
    settings = dict(
        format=FORMAT,
        tokenizer=tok.name,
        fingerprint=tok.fingerprint,
        seq_len=seq_len,
        val_docs=val_docs,
        val_fraction=val_fraction,
    )
    if layout != "bos":  # the default leaves the hash (and earlier folders) as they were
        settings["layout"] = layout
    h.update(json.dumps(settings, sort_keys=True).encode())
    for s in srcs:
        s.hash_into(h)
    return h.hexdigest()[:32]


def _tokenizer_meta(tok: Any) -> dict:
    return {
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "mask_id": tok.mask_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
    }


def _check_settings(
    seq_len: int, val_docs: int | None, val_fraction: float | None, num_proc: int
) -> float | None:
    """Eager checks of prepare's settings; returns the validation fraction to use."""
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
        return DEFAULT_VAL_FRACTION
    return val_fraction


def _split_rows(
    ids: list[np.ndarray], n_val: int, seq_len: int, tok: Any, dtype: np.dtype, layout: str = "bos"
) -> tuple[dict, dict]:
    """Rows and counts per split: the last `n_val` documents are the validation split."""
    parts = {"train": ids[: len(ids) - n_val], "validation": ids[len(ids) - n_val :]}
    rows, splits = {}, {}
    for name, part in parts.items():
        rows[name] = _pack(part, seq_len, tok.bos_id, tok.eos_id, dtype, layout)
        tokens = int(sum(len(x) + 1 for x in part))
        if len(rows[name]) == 0 and part:
            flag = "--seq-len" if name == "train" else "--seq-len or a larger --val-fraction/--val-docs"
            raise UsageError(
                f"the {name} split ({len(part)} documents, {tokens} tokens) is too small for one row of "
                f"{seq_len} tokens; use a smaller {flag}"
            )
        splits[name] = {"rows": int(len(rows[name])), "docs": len(part), "tokens": tokens}
    return rows, splits
