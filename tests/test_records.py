"""The did.sample/1 JSONL format: validation messages, round trip, and whole-line writes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from did_cli.errors import DidError
from did_cli.io.record_writer import RecordWriter
from did_cli.io.records import SCHEMA, make_record, read_records, validate

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    from did_cli.io.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


def _rec(**kw):
    rec = {
        "schema": SCHEMA,
        "id": "0",
        "tokens": [50256, 15496, 995],
        "confidence": [None, 0.5, 0.25],
        "text": "Hello world",
    }
    rec.update(kw)
    return rec


def test_make_record_decodes_without_bos_and_mask(tok):
    ids = [tok.bos_id] + tok.encode("Hello world") + [tok.mask_id]
    rec = make_record(ids, [None, 0.9, 0.8, None], id="a", tokenizer=tok, nfe=3, seconds=0.5)
    assert rec["text"] == "Hello world"
    assert rec["schema"] == SCHEMA and rec["nfe"] == 3 and "prompt_len" not in rec
    # prompt positions [0, prompt_len) never carry a confidence
    rec2 = make_record(ids, [0.1, 0.9, 0.8, 0.7], id="b", tokenizer=tok, prompt_len=2)
    assert rec2["confidence"][:2] == [None, None] and rec2["prompt_len"] == 2


def test_round_trip_file(tmp_path, tok):
    recs = [
        make_record(
            [tok.bos_id] + tok.encode(t),
            [None] + [0.5] * len(tok.encode(t)),
            id=str(i),
            tokenizer=tok,
            model={"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id},
            stages=[
                {"block_size": 8, "ratio": 0.25, "remasked": [1], "changed": 1, "nfe": 1, "seconds": 0.1}
            ],
        )
        for i, t in enumerate(["Hello world", "naïve café — ünïcode", "a\nnew line"])
    ]
    out = tmp_path / "s.jsonl"
    with RecordWriter(out) as w:
        for r in recs:
            w.write(r)
        assert not out.exists()  # lands under its final name only when complete
    assert w.count == 3 and not (tmp_path / "s.jsonl.partial").exists()
    assert out.read_text(encoding="utf-8").count("\n") == 3
    back = list(read_records(out, vocab_size=tok.vocab_size, need=("tokens", "confidence", "text")))
    assert back == recs


def test_stdout_and_stdin(capsys, monkeypatch):
    with RecordWriter("-") as w:
        w.write(_rec(id="x"))
        w.write(_rec(id="y"))
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.splitlines()) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n" + out + "\n\n"))
    assert [r["id"] for r in read_records("-")] == ["x", "y"]


@pytest.mark.parametrize(
    "line, expect",
    [
        ("{not json", ": not JSON"),
        ("[1, 2]", ": not a JSON object"),
        (json.dumps({"id": "1", "tokens": [1]}), "missing 'schema'"),
        (json.dumps(_rec(schema="did.sample/9")), "unsupported schema 'did.sample/9'"),
        (json.dumps({"schema": SCHEMA, "id": "1"}), "missing field 'tokens'"),
        (json.dumps(_rec(confidence=[None])), "'confidence' has 1 entries but 'tokens' has 3"),
        (json.dumps(_rec(tokens=[0, -1, 2])), "token id -1 at position 1 outside"),
        (json.dumps(_rec(tokens=[0, True, 2])), "'tokens' must be a list of integers"),
        (json.dumps(_rec(id=7)), "'id' must be a string"),
        (json.dumps(_rec(model={"vocab_size": 16000})), "token id 50256 at position 0 outside [0, 16000)"),
    ],
)
def test_bad_line_names_line_and_file(tmp_path, line, expect):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_rec()) + "\n" + line + "\n")
    with pytest.raises(DidError) as e:
        list(read_records(p))
    msg = str(e.value)
    assert expect in msg and msg.startswith(f"line 2 of {p}: ") and "\n" not in msg


def test_validate_vocab_and_need():
    with pytest.raises(DidError, match=r"^line 4: token id 50256 at position 0 outside \[0, 1000\)$"):
        validate(_rec(), line_no=4, vocab_size=1000)
    rec = {"schema": SCHEMA, "text": "only text"}
    with pytest.raises(DidError, match="missing fields 'id', 'tokens', 'confidence'"):
        validate(rec)
    assert validate(rec, need=("text",)) is rec


def test_empty_input(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(DidError, match="no records in .*empty.jsonl"):
        list(read_records(p))
    with pytest.raises(DidError, match="cannot read"):
        list(read_records(tmp_path / "absent.jsonl"))


def test_unwritable_destination_fails_at_open(tmp_path):
    with pytest.raises(DidError, match="no_such_dir"):
        RecordWriter(tmp_path / "no_such_dir" / "s.jsonl")
    with pytest.raises(DidError, match="is a directory"):
        RecordWriter(tmp_path)


def test_error_keeps_partial_with_whole_lines(tmp_path):
    out = tmp_path / "s.jsonl"
    with pytest.raises(RuntimeError):
        with RecordWriter(out) as w:
            w.write(_rec(id="1"))
            raise RuntimeError("crash mid-run")
    assert not out.exists()
    assert (tmp_path / "s.jsonl.partial").read_text() == json.dumps(
        _rec(id="1"), separators=(",", ":")
    ) + "\n"


def test_failed_write_never_leaves_half_a_line(tmp_path):
    # a real short write: the file-size limit cuts the third record off midway (EFBIG)
    script = textwrap.dedent(
        f"""
        import resource, signal, json
        from did_cli.errors import DidError
        from did_cli.io.records import SCHEMA
        from did_cli.io.record_writer import RecordWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        rec = {{"schema": SCHEMA, "id": "0", "tokens": list(range(1000)),
               "confidence": [0.5] * 1000, "text": "x"}}
        size = len(json.dumps(rec, separators=(",", ":"))) + 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(size * 2.5), int(size * 2.5)))
        try:
            with RecordWriter({str(tmp_path / "s.jsonl")!r}) as w:
                for i in range(5):
                    w.write(rec)
        except DidError as e:
            print("ERR", e)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "ERR cannot write" in r.stdout and "s.jsonl" in r.stdout, r.stderr
    data = (tmp_path / "s.jsonl.partial").read_text()
    assert data.endswith("\n") and len(data.splitlines()) == 2
    assert all(json.loads(line)["schema"] == SCHEMA for line in data.splitlines())
    assert not (tmp_path / "s.jsonl").exists()
