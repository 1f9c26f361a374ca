"""Refinement: re-mask selection, global and block-wise regeneration, confidence modes, and the
`did draft | did refine` command line with its error handling."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys

import pytest
from conftest import tiny_model
from typer.testing import CliRunner

from did_cli import cli
from did_cli.errors import DidError
from did_cli.io.model_folder import save_model
from did_cli.io.records import validate
from did_cli.sampling import DraftConfig, RefineConfig, draft, parse_stages, refine

L = 32
N_GEN = L - 1


@pytest.fixture(scope="module")
def model():
    return tiny_model(length=L, seed=2, std=0.08)


@pytest.fixture(scope="module")
def drafts(model, tok):
    return list(
        draft(model, DraftConfig(n=3, batch_size=3, block_size=4, seed=1), tokenizer=tok, progress=False)
    )


def run(model, tok, recs, **kw):
    return list(refine(model, [dict(r) for r in recs], RefineConfig(**kw), tokenizer=tok, progress=False))


def lowest(conf, k, lo=1):
    """The k lowest-confidence generated positions, ties to the lower position, sorted."""
    order = sorted(range(lo, len(conf)), key=lambda p: (conf[p], p))
    return sorted(order[:k])


def test_ratio_zero_is_a_no_op(model, tok, drafts):
    out = run(model, tok, drafts, stages=[(None, 0.0)])
    for d, r in zip(drafts, out):
        assert r["tokens"] == d["tokens"] and r["confidence"] == d["confidence"] and r["text"] == d["text"]
        st = r["stages"][-1]
        assert st["remasked"] == [] and st["changed"] == 0 and st["nfe"] == 0
        assert r["draft_tokens"] == d["tokens"] and r["nfe"] == d["nfe"]


def test_ratio_one_global_regenerates_everything(model, tok, drafts):
    out = run(model, tok, drafts, stages=[(None, 1.0)])
    for d, r in zip(drafts, out):
        validate(r, vocab_size=model.config.vocab_size)
        st = r["stages"][-1]
        assert st["remasked"] == list(range(1, L)) and st["block_size"] == L
        assert st["nfe"] == N_GEN  # first-hitting: one call per regenerated token
        assert r["nfe"] == d["nfe"] + N_GEN
        assert r["tokens"][0] == d["tokens"][0] and r["tokens"] != d["tokens"]
        assert all(0.0 < c <= 1.0 for c in r["confidence"][1:])
        assert st["changed"] == sum(a != b for a, b in zip(r["tokens"], d["tokens"]))


def test_remask_set_is_lowest_confidence_with_deterministic_ties(model, tok, drafts):
    d = dict(drafts[0])
    # hand-made confidences with many ties: position p gets (p % 5) / 10 + 0.05
    d["confidence"] = [None] + [(p % 5) / 10 + 0.05 for p in range(1, L)]
    ratio = 0.25
    k = math.ceil(ratio * N_GEN)
    expected = lowest(d["confidence"], k)
    # six positions at 0.05, then the 0.15 ties go to the lowest positions (1 and 6)
    assert expected == [1, 5, 6, 10, 15, 20, 25, 30]
    r = run(model, tok, [d], stages=[(None, ratio)])[0]
    st = r["stages"][0]
    assert st["remasked"] == expected and len(expected) == k == 8
    for p in range(L):
        if p not in expected:  # kept tokens keep their token and confidence
            assert r["tokens"][p] == d["tokens"][p] and r["confidence"][p] == d["confidence"][p]
    assert all(0.0 < r["confidence"][p] <= 1.0 for p in expected)


def test_stages_chain_and_blockwise_stage_keeps_the_rest(model, tok, drafts):
    out = run(model, tok, drafts, stages=[(8, 0.3), (None, 0.2)])
    # the batch shares its calls: per block the most masks any record has there, plus one
    # commit pass per block before the last block holding a mask
    sets = [r["stages"][0]["remasked"] for r in out]
    last = max(p // 8 for s in sets for p in s)
    calls = sum(max(sum(1 for p in s if p // 8 == j) for s in sets) for j in range(last + 1))
    for d, r in zip(drafts, out):
        s1, s2 = r["stages"]
        assert s1["block_size"] == 8 and s2["block_size"] == L
        assert len(s1["remasked"]) == math.ceil(0.3 * N_GEN) and len(s2["remasked"]) == math.ceil(0.2 * N_GEN)
        assert s1["remasked"] == lowest(d["confidence"], len(s1["remasked"]))
        assert r["nfe"] == d["nfe"] + s1["nfe"] + s2["nfe"]
        assert s1["nfe"] == calls and s1["forward_passes"] == calls + last  # the commits are passes, not NFEs
        assert r["forward_passes"] == d["forward_passes"] + s1["forward_passes"] + s2["forward_passes"]
        untouched = set(range(L)) - set(s1["remasked"]) - set(s2["remasked"])
        assert all(r["tokens"][p] == d["tokens"][p] for p in untouched)
        assert r["draft_tokens"] == d["tokens"]


def test_refine_is_deterministic_and_batch_independent(model, tok, drafts):
    a = run(model, tok, drafts, stages=[(None, 0.25)], batch_size=3)
    b = run(model, tok, drafts, stages=[(None, 0.25)], batch_size=1)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    c = run(model, tok, drafts, stages=[(None, 0.25)], seed=9)
    assert [r["tokens"] for r in a] != [r["tokens"] for r in c]


def test_parallel_refine(model, tok, drafts):
    out = run(model, tok, drafts, stages=[(None, 0.5)], sampler="parallel", tokens_per_step=4)
    st = out[0]["stages"][0]
    assert len(st["remasked"]) == 16 and st["nfe"] == 4
    out = run(model, tok, drafts, stages=[(8, 0.5)], sampler="parallel", threshold=0.9)
    assert all(model.config.mask_id not in r["tokens"] for r in out)


def test_posthoc_and_random_modes_run_and_differ(model, tok, drafts):
    stages = [(None, 0.25)]
    snap = run(model, tok, drafts, stages=stages)
    post = run(model, tok, drafts, stages=stages, confidence="posthoc")
    rand = run(model, tok, drafts, stages=stages, confidence="random")
    sets = [[r["stages"][0]["remasked"] for r in x] for x in (snap, post, rand)]
    assert sets[0] != sets[1] and sets[0] != sets[2] and sets[1] != sets[2]
    assert all(len(s) == 8 for x in sets for s in x)
    # the re-scoring pass is a forward pass, not a denoising NFE
    assert post[0]["stages"][0]["nfe"] == 8 and post[0]["stages"][0]["forward_passes"] == 8 + 1
    assert post[0]["stages"][0]["confidence"] == "posthoc"
    # posthoc re-scores with the model: positions kept carry those scores, not the draft's
    kept = [p for p in range(1, L) if p not in sets[1][0]]
    assert any(post[0]["confidence"][p] != drafts[0]["confidence"][p] for p in kept)
    again = run(model, tok, drafts, stages=stages, confidence="random")
    assert [r["tokens"] for r in again] == [r["tokens"] for r in rand]


def test_library_rejects_bad_records(model, tok, drafts):
    d = drafts[0]
    bad_vocab = dict(d, model=dict(d["model"], vocab_size=1000))
    with pytest.raises(DidError, match="vocabulary size 1000"):
        run(model, tok, [bad_vocab])
    with pytest.raises(DidError, match="outside"):
        run(model, tok, [dict(d, tokens=[0] * (L - 1) + [model.config.vocab_size])])
    with pytest.raises(DidError, match="longer than the model"):
        run(model, tok, [dict(d, tokens=d["tokens"] * 2, confidence=d["confidence"] * 2)])
    with pytest.raises(DidError, match=r"\[MASK\]"):
        run(model, tok, [dict(d, tokens=[d["tokens"][0], model.config.mask_id] + d["tokens"][2:])])
    with pytest.raises(DidError, match="no confidence at position 3"):
        run(model, tok, [dict(d, confidence=d["confidence"][:3] + [None] + d["confidence"][4:])])


def test_parse_stages():
    assert parse_stages("64:0.3,L:0.2") == [(64, 0.3), (None, 0.2)]
    from did_cli.errors import UsageError

    for bad in ("64", "x:0.2", "", "4:y"):
        with pytest.raises(UsageError, match="--stages"):
            parse_stages(bad)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("ckpt") / "m"
    save_model(model, folder)
    return folder


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    return env


@pytest.mark.slow
def test_shell_pipe_draft_into_refine(ckpt, tmp_path):
    did = f"{shlex.quote(sys.executable)} -m did_cli.cli"
    m = shlex.quote(str(ckpt))
    cmd = (
        f"set -o pipefail; {did} draft --model {m} -n 3 --batch-size 2 --block-size 4 --device cpu "
        f"| {did} refine --model {m} - --stages 8:0.2,L:0.25 --device cpu"
    )
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        rec = validate(json.loads(line), vocab_size=50258)
        assert rec["id"] == f"draft-0-{i}" and len(rec["tokens"]) == L
        assert [s["block_size"] for s in rec["stages"]] == [8, L]
        assert rec["model"]["path"] == str(ckpt)
    assert "Traceback" not in r.stderr and "NFEs" in r.stderr


# the real subcommands behind the real error guard, in-process (a subprocess costs seconds)
APP = cli.build_app()


def _cli(args, input=None):
    return CliRunner().invoke(APP, args, input=input)


def _one_line_error(r, code=None):
    assert r.exit_code != 0 and (code is None or r.exit_code == code), (r.exit_code, r.stderr)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("did: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    return err[0]


def test_cli_draft_to_file_and_refine_file(ckpt, tmp_path):
    out = tmp_path / "d.jsonl"
    r = _cli(
        ["draft", "--model", str(ckpt), "-n", "2", "--block-size", "16", "--device", "cpu", "-o", str(out)]
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "" and len(out.read_text().splitlines()) == 2
    r = _cli(["refine", "--model", str(ckpt), str(out), "--confidence", "random", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 2 and recs[0]["stages"][0]["confidence"] == "random"


@pytest.fixture(scope="module")
def good_line(drafts):
    return json.dumps(drafts[0])


def test_cli_malformed_line_names_its_number(ckpt, good_line):
    r = _cli(["refine", "--model", str(ckpt), "-", "--batch-size", "1"], input=good_line + "\n{not json\n")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("did: error")]
    assert len(errors) == 1 and "line 2 of stdin: not JSON" in errors[0]
    # streaming stdin: the first record was refined and written whole before line 2 failed
    out = r.stdout.splitlines()
    assert len(out) == 1 and json.loads(out[0])["id"] == "draft-1-0"


@pytest.mark.parametrize(
    "mutate,needle,code",
    [
        (lambda d: dict(d, tokens=d["tokens"][:-1] + [60000]), "line 1 of stdin: token id 60000", 1),
        (
            lambda d: dict(d, tokens=d["tokens"] * 2, confidence=d["confidence"] * 2),
            "longer than the model",
            1,
        ),
        (lambda d: dict(d, model=dict(d["model"], vocab_size=32001)), "vocabulary size 32001", 1),
        (lambda d: dict(d, model=dict(d["model"], fingerprint="0123")), "another tokenizer", 1),
    ],
)
def test_cli_bad_records(ckpt, drafts, tmp_path, mutate, needle, code):
    bad = json.dumps(mutate(drafts[0]))
    f = tmp_path / "in.jsonl"
    f.write_text(bad + "\n")
    for src, stdin in ((str(f), None), ("-", bad + "\n")):
        line = _one_line_error(_cli(["refine", "--model", str(ckpt), src], input=stdin), code)
        assert needle.replace("stdin", "stdin" if src == "-" else str(f)) in line


def test_cli_empty_input_and_bad_options(ckpt, tmp_path):
    assert "no records" in _one_line_error(_cli(["refine", "--model", str(ckpt), "-"], input=""), 1)
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    assert "no records" in _one_line_error(_cli(["refine", "--model", str(ckpt), str(f)]), 1)
    assert "--block-size 5" in _one_line_error(_cli(["draft", "--model", str(ckpt), "--block-size", "5"]), 2)
    assert "--length 64" in _one_line_error(_cli(["draft", "--model", str(ckpt), "--length", "64"]), 2)
    assert "--stages" in _one_line_error(
        _cli(["refine", "--model", str(ckpt), "--stages", "5:0.2"], input=""), 2
    )
    assert "--stages" in _one_line_error(
        _cli(["refine", "--model", str(ckpt), "--stages", "8:1.5"], input=""), 2
    )
    assert "--model" in _one_line_error(_cli(["draft", "--model", str(tmp_path / "nope")]), 1)
    missing_dir = tmp_path / "no" / "x.jsonl"
    assert "does not exist" in _one_line_error(
        _cli(["draft", "--model", str(ckpt), "-o", str(missing_dir)]), 1
    )
    assert not list(tmp_path.glob("**/*.partial"))


def test_cli_malformed_line_in_a_subprocess(ckpt):
    r = subprocess.run(
        [sys.executable, "-m", "did_cli.cli", "refine", "--model", str(ckpt), "-"],
        input='{"schema": "did.sample/1"\n',
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert r.returncode == 1 and r.stdout == ""
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "line 1" in err[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_model_may_name_a_run_folder_or_its_best_checkpoint(model, tmp_path):
    from did_cli.io import checkpoint as ck

    run_dir = tmp_path / "run"
    for step in (1, 2):
        path = ck.save_checkpoint(run_dir, step, lambda folder: save_model(model, folder))
        if step == 1:
            ck.write_best(run_dir, path, {"step": 1})
    for spec in (run_dir, run_dir / "best", run_dir / "latest"):
        r = _cli(["draft", "--model", str(spec), "-n", "1", "--device", "cpu"])
        assert r.exit_code == 0, r.output
        rec = json.loads(r.stdout.splitlines()[-1])
        want = "step-00000001" if spec.name == "best" else "step-00000002"
        assert rec["model"]["path"].endswith(want), (spec, rec["model"]["path"])
    r = _cli(["draft", "--model", str(tmp_path / "nowhere" / "best"), "-n", "1"])
    assert r.exit_code == 1 and "no such folder" in r.output
