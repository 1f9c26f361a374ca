"""`did prepare`: sources -> rows of [BOS] + stream tokens, splits by document, reuse, errors."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

from did_cli.errors import DidError, UsageError
from did_cli.io.data import PreparedData
from did_cli.io.packing import prepare
from did_cli.io.tokenizer import load_tokenizer

BOS = EOS = 50256
HELLO_WORLD = [15496, 995]
HI = [17250]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def _run(tmp_path, sources, **kw):
    kw.setdefault("progress", False)
    return prepare([str(s) for s in sources], tmp_path / "out", **kw)


def test_exact_row_layout_from_txt_folder(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Hello world")
    (src / "sub" / "b.txt").write_text("Hi")  # folders are read recursively in sorted order
    (src / "notes.md").write_text("ignored: not a supported type")
    meta = _run(tmp_path, [src], seq_len=4, val_docs=0)
    # stream: Hello world EOS Hi EOS Hello... -> rows of BOS + 3 stream tokens
    rows = PreparedData(tmp_path / "out").rows("train")
    assert rows.dtype == np.uint16 and rows.shape == (1, 4)
    assert rows.tolist() == [[BOS, *HELLO_WORLD, EOS]]  # the partial row [Hi, EOS] is dropped
    assert meta["splits"]["train"] == {"rows": 1, "docs": 2, "tokens": 5}
    assert meta["splits"]["validation"] == {"rows": 0, "docs": 0, "tokens": 0}
    assert PreparedData(tmp_path / "out").rows("validation").shape == (0, 4)

    meta = prepare([str(src)], tmp_path / "out2", seq_len=3, val_docs=0, progress=False)
    rows = PreparedData(tmp_path / "out2").rows("train")
    assert rows.tolist() == [[BOS, 15496, 995], [BOS, EOS, 17250]]


def test_meta_fields(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world " * 50)
    meta = _run(tmp_path, [tmp_path / "a.txt"], seq_len=8, val_docs=0)
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == {k: v for k, v in meta.items() if k != "reused"}
    assert on_disk["format"] == "did.prepared/1"
    assert (on_disk["tokenizer"], on_disk["vocab_size"], on_disk["mask_id"]) == ("gpt2", 50258, 50257)
    assert (on_disk["bos_id"], on_disk["eos_id"], on_disk["seq_len"], on_disk["dtype"]) == (
        BOS,
        EOS,
        8,
        "uint16",
    )
    assert len(on_disk["tokenizer_fingerprint"]) == 16 and len(on_disk["content_hash"]) == 32
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json",
        "train.bin",
        "validation.bin",
    ]
    raw = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2")
    assert raw.size == on_disk["splits"]["train"]["rows"] * 8 and raw[0] == BOS


def test_jsonl_json_parquet_and_compressed_give_same_rows(tmp_path, tok):
    texts = ["Hello world", "", "Hi", "Call me Ishmael. Some years ago, never mind how long precisely."]
    objs = [{"text": t, "id": i} for i, t in enumerate(texts)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objs) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(objs))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress((tmp_path / "d.jsonl").read_bytes()))
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress((tmp_path / "d.jsonl").read_bytes()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts, "id": list(range(4))}), tmp_path / "d.parquet")
    stream = []
    for t in texts:
        if t:  # blank documents are skipped
            stream += tok.encode(t) + [EOS]
    n = len(stream) // 3
    expected = [[BOS, *stream[3 * r : 3 * r + 3]] for r in range(n)]
    for name in ("d.jsonl", "d.json", "d.parquet", "d.jsonl.gz", "d.jsonl.xz"):
        meta = prepare(
            [str(tmp_path / name)], tmp_path / f"out_{name}", seq_len=4, val_docs=0, progress=False
        )
        assert meta["splits"]["train"]["docs"] == 3, name
        assert PreparedData(tmp_path / f"out_{name}").rows().tolist() == expected, name


def test_validation_split_takes_last_documents(tmp_path, tok):
    texts = [f"Document number {i} says hello." for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    meta = _run(tmp_path, [tmp_path / "d.jsonl"], seq_len=5, val_docs=2)
    assert meta["splits"]["train"]["docs"] == 8 and meta["splits"]["validation"]["docs"] == 2
    val = PreparedData(tmp_path / "out").rows("validation")
    assert (val[:, 0] == BOS).all()
    val_stream = tok.encode(texts[8]) + [EOS] + tok.encode(texts[9]) + [EOS]
    assert val[:, 1:].reshape(-1).tolist() == val_stream[: val.shape[0] * 4]
    assert meta["splits"]["validation"]["tokens"] == len(val_stream)

    meta = prepare(
        [str(tmp_path / "d.jsonl")], tmp_path / "out_f", seq_len=5, val_fraction=0.3, progress=False
    )
    assert meta["splits"]["validation"]["docs"] == 3 and meta["splits"]["train"]["docs"] == 7
    meta = prepare([str(tmp_path / "d.jsonl")], tmp_path / "out_d", seq_len=5, progress=False)
    assert meta["splits"]["validation"]["docs"] == 0  # default 5% of 10 documents rounds to 0
    assert meta["val_fraction"] == 0.05


def test_rerun_reuses_and_settings_change_rebuilds(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Hello world. " * 40)
    (tmp_path / "b.txt").write_text("Hi there. " * 40)
    srcs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    first = _run(tmp_path, srcs, seq_len=8, val_docs=1)
    out = tmp_path / "out"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    meta_text = (out / "meta.json").read_text()
    capsys.readouterr()
    again = _run(tmp_path, srcs, seq_len=8, val_docs=1)
    assert again["reused"] is True and first["reused"] is False
    assert "reusing" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert (out / "meta.json").read_text() == meta_text
    # a different setting is refused without force (docs/reliability.md), then rebuilds; different
    # source bytes of the same sources and settings rebuild
    with pytest.raises(DidError, match="already holds prepared data of other sources or settings"):
        _run(tmp_path, srcs, seq_len=16, val_docs=1)
    assert (out / "meta.json").read_text() == meta_text
    assert _run(tmp_path, srcs, seq_len=16, val_docs=1, force=True)["reused"] is False
    (tmp_path / "b.txt").write_text("Hi there! " * 40)
    rebuilt = _run(tmp_path, srcs, seq_len=16, val_docs=1)
    assert rebuilt["reused"] is False and rebuilt["content_hash"] != first["content_hash"]


def test_non_utf8_is_replaced_with_one_warning(tmp_path, capsys, tok):
    (tmp_path / "latin1.txt").write_bytes("café au lait, naïve. ".encode("latin-1") * 10)
    _run(tmp_path, [tmp_path / "latin1.txt"], seq_len=8, val_docs=0)
    err = capsys.readouterr().err
    assert err.count("latin1.txt") == 1 and "UTF-8" in err
    rows = PreparedData(tmp_path / "out").rows()
    assert "caf\ufffd au lait" in tok.decode(rows[:, 1:].reshape(-1))


def test_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n ")
    (tmp_path / "short.txt").write_text("Hello world")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    (tmp_path / "notjson.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(DidError, match="no text found"):
        _run(tmp_path, [tmp_path / "blank.txt"])
    with pytest.raises(UsageError, match="does not exist"):
        _run(tmp_path, [tmp_path / "missing.txt"])
    with pytest.raises(UsageError, match="--seq-len"):
        _run(tmp_path, [tmp_path / "short.txt"], seq_len=1)
    with pytest.raises(UsageError, match="--val-docs.*--val-fraction"):
        _run(tmp_path, [tmp_path / "short.txt"], val_docs=1, val_fraction=0.1)
    with pytest.raises(UsageError, match="too small.*--seq-len"):
        _run(tmp_path, [tmp_path / "short.txt"], seq_len=64, val_docs=0)
    with pytest.raises(UsageError, match="leaving none to train"):
        _run(tmp_path, [tmp_path / "short.txt"], val_docs=1)
    with pytest.raises(DidError, match=r"line 2 of .*bad.jsonl"):
        _run(tmp_path, [tmp_path / "bad.jsonl"])
    with pytest.raises(DidError, match=r"line 2 of .*notjson.jsonl: not JSON"):
        _run(tmp_path, [tmp_path / "notjson.jsonl"])
    with pytest.raises(UsageError, match="unsupported file type"):
        _run(tmp_path, [tmp_path / "a.csv"])
    assert not (tmp_path / "out").exists()


def test_prepared_data_checks(tmp_path):
    with pytest.raises(DidError, match="no meta.json"):
        PreparedData(tmp_path / "nothing")
    (tmp_path / "a.txt").write_text("Hello world. " * 40)
    _run(tmp_path, [tmp_path / "a.txt"], seq_len=8, val_docs=0)
    data = PreparedData(tmp_path / "out")
    assert data.seq_len == 8
    data.check_compatible(tokenizer="gpt2", vocab_size=50258, seq_len=8)
    data.check_compatible(tokenizer="openai-community/gpt2", vocab_size=50258)
    with pytest.raises(DidError, match="seq-len 16"):
        data.check_compatible(tokenizer="gpt2", vocab_size=50258, seq_len=16)
    with pytest.raises(DidError, match="vocab_size"):
        data.check_compatible(tokenizer="gpt2", vocab_size=50257)
    with pytest.raises(DidError, match="tokenised with 'gpt2'"):
        data.check_compatible(tokenizer="other/tok", vocab_size=50258)
    with pytest.raises(DidError, match="no 'test' split"):
        data.rows("test")
    with open(tmp_path / "out" / "train.bin", "ab") as f:
        f.write(b"\0\0")  # a truncated or padded file is refused, not misread
    with pytest.raises(DidError, match="expected"):
        data.rows("train")


def test_worker_processes_give_identical_rows(tmp_path):
    texts = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([str(tmp_path / "d.jsonl")], tmp_path / "one", seq_len=16, val_docs=4, progress=False)
    prepare([str(tmp_path / "d.jsonl")], tmp_path / "two", seq_len=16, val_docs=4, num_proc=2, progress=False)
    for split in ("train", "validation"):
        a, b = PreparedData(tmp_path / "one").rows(split), PreparedData(tmp_path / "two").rows(split)
        assert a.shape[0] > 0 and np.array_equal(a, b)


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "did_cli.cli", "prepare", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_missing_source_is_one_line(tmp_path):
    r = _cli("missing.txt", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.txt" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = _cli("--out", "out", "--val-docs", "1", "--val-fraction", "0.1", cwd=tmp_path)
    assert r.returncode == 2 and "--val-docs" in r.stderr and "--val-fraction" in r.stderr


def test_cli_prepares_and_summarises(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"Line {i} of text."}) + "\n" for i in range(20))
    )
    r = _cli("d.jsonl", "--out", "out", "--seq-len", "8", "--val-docs", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stderr and "validation" in r.stderr and "rows" in r.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["validation"]["docs"] == 5 and meta["seq_len"] == 8


@pytest.mark.slow
def test_bundled_corpus_prepares(tmp_path, tok):
    meta = prepare(None, tmp_path / "out", seq_len=128, progress=False)
    data = PreparedData(tmp_path / "out")
    train, val = data.rows("train"), data.rows("validation")
    assert meta["sources"] == ["bundled:corpus.jsonl.xz"]
    assert meta["splits"]["train"]["tokens"] > 3_500_000 and meta["splits"]["train"]["docs"] > 10_000
    assert train.shape == (meta["splits"]["train"]["rows"], 128) and val.shape[0] > 1000
    assert (train[:, 0] == BOS).all() and (val[:, 0] == BOS).all()
    assert int(train.max()) < 50257  # [MASK] never appears in data
    assert len(tok.decode(train[0, 1:])) > 200
