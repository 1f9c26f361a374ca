"""The bundled GPT-2 tokenizer, the [MASK] id, and loading other tokenizers."""

from __future__ import annotations

import json
import lzma
import time

import numpy as np
import pytest

from did_cli.core.model_config import BOS_ID, EOS_ID, GPT2_VOCAB, MASK_ID
from did_cli.errors import DidError
from did_cli.io.sources import BUNDLED_CORPUS
from did_cli.io.tokenizer import GPT2_DIR, canonical_name, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def test_hello_world_matches_openai_gpt2(tok):
    # a silently broken loader returns [] here
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.encode("<|endoftext|>")[0] == 50256  # the special token is recognised in text


def test_special_ids_and_vocab(tok):
    assert tok.name == "gpt2"
    assert len(tok.hf) == GPT2_VOCAB == 50257
    assert tok.vocab_size == 50258 and tok.mask_id == MASK_ID == 50257
    assert tok.bos_id == BOS_ID == 50256 and tok.eos_id == EOS_ID == 50256
    assert len(tok.fingerprint) == 16


def test_round_trip(tok):
    text = "Call me Ishmael.\n\n  Some years ago — never mind how long — naïve café 東京 🙂\tend"
    ids = tok.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "Hello world", ""]) == [ids, [15496, 995], []]


def test_decode_mask_and_specials(tok):
    ids = [15496, MASK_ID, 995, EOS_ID]
    assert tok.decode(ids) == "Hello world<|endoftext|>"
    assert tok.decode(ids, skip_special=True) == "Hello world"
    assert tok.decode(ids, mask_marker="[MASK]") == "Hello[MASK] world<|endoftext|>"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "Hello world<|endoftext|>"
    assert tok.decode([MASK_ID, MASK_ID]) == ""


def test_aliases_are_cached(tok):
    assert load_tokenizer("openai-community/gpt2") is tok
    assert canonical_name("openai-community/gpt2") == "gpt2"


def test_bundled_files_have_expected_format():
    merges = (GPT2_DIR / "merges.txt").read_text("utf-8")
    assert merges.startswith("#version")
    assert len(merges.splitlines()) == 50001  # header + 50000 merges
    vocab = json.loads((GPT2_DIR / "vocab.json").read_text("utf-8"))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    assert (GPT2_DIR / "LICENSE").is_file()


def test_missing_folder_is_a_one_line_error(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DidError) as e:
        load_tokenizer(str(tmp_path / "no_such_tokenizer"))
    assert "no_such_tokenizer" in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 5  # a path never goes to the network


def test_folder_without_tokenizer_files_is_a_didError(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DidError, match="empty"):
        load_tokenizer(str(tmp_path / "empty"))


def test_local_hf_folder_gets_mask_appended(tok, tmp_path):
    tok.hf.save_pretrained(tmp_path / "tok")
    other = load_tokenizer(str(tmp_path / "tok"))
    assert other is not tok and other.name == str(tmp_path / "tok")
    assert other.encode("Hello world") == [15496, 995]
    assert (other.mask_id, other.vocab_size, other.bos_id, other.eos_id) == (50257, 50258, 50256, 50256)
    assert other.fingerprint == tok.fingerprint  # same token -> id mapping


def test_bundled_corpus_slice_tokenises(tok):
    docs = []
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if len(docs) == 200:
                break
    assert all(set(d) == {"text", "source"} and d["text"].strip() for d in docs)
    assert all(d["source"].split(":", 1)[0] in ("gutenberg", "wikipedia") for d in docs)
    ids = tok.encode_batch([d["text"] for d in docs])
    assert all(len(x) > 0 for x in ids)
    assert tok.decode(ids[0]) == docs[0]["text"]
    assert BUNDLED_CORPUS.stat().st_size < 6_000_000
