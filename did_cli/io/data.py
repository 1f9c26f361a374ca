"""Prepared data as `did prepare` (did_cli.io.packing) leaves it: a folder with `train.bin`,
`validation.bin` (rows of seq_len token ids, memory-mapped) and `meta.json` (format
"did.prepared/1"); the formats are in docs/formats.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from did_cli.errors import DidError
from did_cli.io.bounded import read_json
from did_cli.io.schemas import check_meta

FORMAT = "did.prepared/1"
SPLITS = ("train", "validation")


class PreparedData:
    """A folder written by `prepare`: `rows(split)` memory-maps [N, seq_len] token rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DidError(
                f"{self.path} is not prepared data (no meta.json); run `did prepare --out {self.path}`"
            )
        meta = read_json(meta_path)  # bounded, checked JSON integers
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DidError(f"{meta_path}: unknown format (expected {FORMAT!r}); re-run `did prepare`")
        check_meta(meta, str(meta_path))
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
            raise DidError(
                f"{f}: expected {expected} bytes for {n} rows of {self.seq_len}, found "
                f"{'no file' if size < 0 else size}; re-run `did prepare`"
            )
        if n == 0:
            return np.empty((0, self.seq_len), dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r", shape=(n, self.seq_len))

    def check_compatible(self, *, tokenizer: str, vocab_size: int, seq_len: int | None = None) -> None:
        """Raise DidError naming the mismatch if a model with these settings cannot use this data.
        Two names of one vocabulary (a GGUF file and the model folder holding its tokenizer) are
        the same tokenizer: when the names differ, the fingerprints decide."""
        from did_cli.io.tokenizer import canonical_name

        mine = canonical_name(self.meta["tokenizer"])
        if (
            canonical_name(tokenizer) != mine
            and not _same_folder(tokenizer, mine)
            and not self.same_vocabulary(tokenizer)
        ):
            raise DidError(
                f"data in {self.path} was tokenised with {mine!r} but the model uses {tokenizer!r}; "
                f"re-run `did prepare --tokenizer {tokenizer}`"
            )
        if int(vocab_size) != self.vocab_size:
            raise DidError(
                f"data in {self.path} has vocab_size {self.vocab_size} (incl. [MASK]) but the model has "
                f"{vocab_size}"
            )
        if seq_len is not None and int(seq_len) != self.seq_len:
            raise DidError(
                f"data in {self.path} has rows of {self.seq_len} tokens but the model length is {seq_len}; "
                f"re-run `did prepare --seq-len {seq_len}`"
            )

    def same_vocabulary(self, tokenizer: str) -> bool:
        """Whether tokenizer `tokenizer` has the fingerprint and vocabulary size recorded in
        meta.json (False when none is recorded or it cannot be loaded)."""
        from did_cli.io.tokenizer import load_tokenizer

        recorded = self.meta.get("tokenizer_fingerprint")
        if not recorded:
            return False
        try:
            tok = load_tokenizer(tokenizer)
        except DidError:
            return False
        return tok.fingerprint == recorded and tok.vocab_size == self.vocab_size


def check_token_ids(data: PreparedData, vocab_size: int, splits: tuple[str, ...] = SPLITS) -> None:
    """Raise DidError naming the split, row and id when a row holds an id outside
    [0, vocab_size) (a damaged or foreign train.bin); one pass in chunks of rows."""
    for split in splits:
        if split not in data.meta["splits"]:
            continue
        rows = data.rows(split)
        step = max(1, (64 << 20) // max(1, rows.shape[1] * rows.dtype.itemsize))
        for lo in range(0, len(rows), step):
            chunk = np.asarray(rows[lo : lo + step])
            if chunk.size and int(chunk.max()) >= vocab_size:
                r, c = (int(v) for v in np.argwhere(chunk >= vocab_size)[0])
                raise DidError(
                    f"{data.path / (split + '.bin')}: row {lo + r} holds token id {int(chunk[r, c])} at "
                    "position "
                    f"{c}, outside the vocabulary [0, {vocab_size}); re-run `did prepare`"
                )


def _same_folder(a: str, b: str) -> bool:
    """Two spellings of one tokenizer folder (relative vs absolute) are the same tokenizer."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
