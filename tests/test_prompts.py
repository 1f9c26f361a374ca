"""Prompts and suffixes: fixed through draft and every refine stage, KV cache = no cache, re-mask
ratio over generated positions only, the prompt -> samples mapping, and input errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import tiny_model
from typer.testing import CliRunner

from did_cli import cli
from did_cli.errors import UsageError
from did_cli.io.model_folder import save_model
from did_cli.io.records import validate
from did_cli.sampling import DraftConfig, RefineConfig, draft, refine

L = 32
PROMPT = [464, 1578, 286, 262, 3329, 373]  # 6 tokens: prompt_len 7 ends mid-block for B = 4
SUFFIX = [13, 383, 886, 13, 198]  # 5 tokens at [27, 32): block 24..27 holds 3 generated + 1 suffix


@pytest.fixture(scope="module")
def model():
    return tiny_model(length=L, seed=1, std=0.08)


# top-p 1 skips the float64 nucleus sort over the 50258-token vocabulary: the costliest part on
# a CPU, and covered with prompts-free drafts in test_sampling.py
def run_draft(model, tok, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("top_p", 1.0)
    return list(draft(model, DraftConfig(**kw), tokenizer=tok, progress=False))


def run_refine(model, tok, recs, **kw):
    kw.setdefault("top_p", 1.0)
    return list(refine(model, [dict(r) for r in recs], RefineConfig(**kw), tokenizer=tok, progress=False))


@pytest.fixture(scope="module")
def drafts(model, tok):
    # two prompts of different lengths in one batch (row-wise mask counts), 2 samples each
    return run_draft(model, tok, n=2, block_size=4, prompts=[PROMPT, "Hello world"], suffix=SUFFIX, seed=5)


def fixed_ok(rec, prompt):
    toks = rec["tokens"]
    lo, hi = 1 + len(prompt), L - len(SUFFIX)
    assert len(toks) == L and toks[0] == 50256
    assert toks[1:lo] == prompt and toks[hi:] == SUFFIX
    assert rec["prompt_len"] == lo and rec["suffix_len"] == len(SUFFIX)
    conf = rec["confidence"]
    assert all(c is None for c in conf[:lo] + conf[hi:])
    assert all(isinstance(c, float) and 0.0 < c <= 1.0 for c in conf[lo:hi])


def test_draft_layout_and_prompt_mapping(drafts, tok):
    hello = tok.encode("Hello world")
    assert [r["id"] for r in drafts] == [f"draft-5-{i}" for i in range(4)]
    assert [r["prompt_id"] for r in drafts] == ["p0", "p0", "p1", "p1"]  # -n samples per prompt
    for r, p in zip(drafts, [PROMPT, PROMPT, hello, hello]):
        validate(r, vocab_size=50258)
        fixed_ok(r, p)
    assert drafts[2]["text"].startswith("Hello world")
    assert drafts[0]["tokens"] != drafts[1]["tokens"]  # each sample its own generator
    assert "prompts" not in drafts[0]["draft"] and "suffix" not in drafts[0]["draft"]


def test_prompt_and_suffix_survive_every_refine_stage(model, tok, drafts):
    prompts = [PROMPT, PROMPT, tok.encode("Hello world"), tok.encode("Hello world")]
    # a block-wise stage (B = 8 < L) then the global stage; ratio 1 re-masks every generated position
    for stages in ([(8, 0.6), (None, 0.6)], [(None, 1.0)]):
        out = run_refine(model, tok, drafts, stages=stages)
        for r, d, p in zip(out, drafts, prompts):
            fixed_ok(r, p)
            assert r["prompt_id"] == d["prompt_id"] and r["draft_tokens"] == d["tokens"]
            for st in r["stages"]:
                assert all(1 + len(p) <= q < L - len(SUFFIX) for q in st["remasked"])
        if stages[-1][1] == 1.0:
            assert out[0]["stages"][-1]["remasked"] == list(range(1 + len(PROMPT), L - len(SUFFIX)))
    # refining a refined record keeps them too (the fields travel with it)
    fixed_ok(run_refine(model, tok, out[:1], stages=[(None, 0.5)])[0], PROMPT)


def lowest(conf, k, lo, hi):
    order = sorted(range(lo, hi), key=lambda p: (conf[p], p))
    return sorted(order[:k])


@pytest.mark.parametrize("block", [8, None])
def test_remask_ratio_counts_generated_positions_only(model, tok, drafts, block):
    ratio = 0.33
    out = run_refine(model, tok, drafts, stages=[(block, ratio)])
    for r, d in zip(out, drafts):
        lo, hi = d["prompt_len"], L - d["suffix_len"]
        k = math.ceil(ratio * (hi - lo))
        assert k != math.ceil(ratio * (L - 1))  # counting over all positions would differ
        assert r["stages"][0]["remasked"] == lowest(d["confidence"], k, lo, hi)
    # the other modes pick the same number, inside the generated span
    if block is None:  # random re-masking picks the same number, inside the generated span
        for r, d in zip(run_refine(model, tok, drafts, stages=[(None, ratio)], confidence="random"), drafts):
            lo, hi = d["prompt_len"], L - d["suffix_len"]
            rm = r["stages"][0]["remasked"]
            assert len(rm) == math.ceil(ratio * (hi - lo)) and all(lo <= q < hi for q in rm)


@pytest.mark.parametrize("sampler,k,block,top_p", [("first-hitting", None, 4, 1.0), ("parallel", 2, 8, 1.0)])
def test_cached_equals_uncached_with_prompts(model, tok, sampler, k, block, top_p):
    kw = dict(
        n=1,
        block_size=block,
        sampler=sampler,
        tokens_per_step=k,
        top_p=top_p,
        seed=2,
        prompts=[PROMPT, PROMPT[:2], PROMPT[:4] + PROMPT],
        suffix=SUFFIX[:3],
    )  # prompt_len 7, 3, 11
    cached = run_draft(model, tok, use_cache=True, **kw)
    plain = run_draft(model, tok, use_cache=False, **kw)
    assert [r["prompt_len"] for r in cached] == [7, 3, 11]
    for a, b in zip(cached, plain):
        assert a["tokens"] == b["tokens"]
        lo, hi = a["prompt_len"], L - 3
        assert a["confidence"][lo:hi] == pytest.approx(b["confidence"][lo:hi], rel=1e-5)


def test_batch_composition_does_not_change_prompted_samples(model, tok):
    kw = dict(n=2, block_size=4, length=16, prompts=[PROMPT[:3], PROMPT], seed=7)
    together = run_draft(model, tok, batch_size=4, **kw)
    alone = run_draft(model, tok, batch_size=1, **kw)
    assert [r["tokens"] for r in together] == [r["tokens"] for r in alone]


def test_var_length_ignores_eos_in_the_prompt(model, tok):
    eos = model.config.eos_id
    recs = run_draft(
        model, tok, n=1, block_size=4, length=8, prompts=[[eos, 11, eos]], var_length=True, seed=1
    )
    assert recs[0]["tokens"][1:4] == [eos, 11, eos] and len(recs[0]["tokens"]) > 4


def test_library_errors(model, tok):
    def err(**kw):
        with pytest.raises(UsageError) as e:
            run_draft(model, tok, n=1, block_size=4, **kw)
        return str(e.value)

    assert "empty" in err(prompts=[""])
    assert "leave no position" in err(prompts=[PROMPT * 6])
    assert "leave no position" in err(prompts=[PROMPT * 2], suffix=PROMPT * 3 + [11])
    assert "exclude" in err(prompts=[PROMPT], suffix=SUFFIX, var_length=True)
    assert "token id" in err(prompts=[[model.config.mask_id]])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("ckpt") / "m"
    save_model(model, folder)
    return folder


APP = cli.build_app()


def _cli(args, input=None):
    return CliRunner().invoke(APP, args, input=input)


def test_cli_prompts_file_suffix_and_refine(ckpt, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"id": "river", "prompt": "The river"}\n\n{"id": "q2", "prompt": "Once upon a time"}\n')
    out = tmp_path / "d.jsonl"
    r = _cli(
        [
            "draft",
            "--model",
            str(ckpt),
            "--prompts",
            str(f),
            "--suffix",
            " The end.",
            "-n",
            "2",
            "--length",
            "16",
            "--block-size",
            "4",
            "--top-p",
            "1",
            "--device",
            "cpu",
            "-o",
            str(out),
        ]
    )
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["prompt_id"] for d in recs] == ["river", "river", "q2", "q2"]
    assert all(d["text"].endswith(" The end.") for d in recs)
    assert recs[0]["text"].startswith("The river") and recs[2]["text"].startswith("Once upon a time")
    r = _cli(
        [
            "refine",
            "--model",
            str(ckpt),
            str(out),
            "--stages",
            "8:0.5,L:0.5",
            "--top-p",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert r.exit_code == 0, r.stderr
    for d, x in zip(recs, (json.loads(line) for line in r.stdout.splitlines())):
        lo, hi = d["prompt_len"], 16 - d["suffix_len"]
        assert x["tokens"][:lo] == d["tokens"][:lo] and x["tokens"][hi:] == d["tokens"][hi:]
    # repeatable --prompt, prompts from stdin
    r = _cli(
        [
            "draft",
            "--model",
            str(ckpt),
            "--prompt",
            "A",
            "--prompt",
            "B",
            "-n",
            "1",
            "--length",
            "8",
            "--block-size",
            "4",
            "--top-p",
            "1",
        ]
    )
    assert r.exit_code == 0, r.stderr
    assert [json.loads(line)["prompt_id"] for line in r.stdout.splitlines()] == ["p0", "p1"]
    r = _cli(
        [
            "draft",
            "--model",
            str(ckpt),
            "--prompts",
            "-",
            "-n",
            "1",
            "--length",
            "8",
            "--block-size",
            "4",
            "--top-p",
            "1",
        ],
        input='{"prompt": "Hi"}\n',
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["text"].startswith("Hi")


@pytest.mark.parametrize(
    "args,stdin,needle,code",
    [
        (["--prompt", "A", "--prompts", "-"], "", "exclude each other", 2),
        (
            ["--prompts", "-"],
            '{"id": "a", "prompt": "x", "suffix": "y"}\n',
            "line 1 of stdin: unknown key 'suffix'",
            1,
        ),
        (
            ["--prompts", "-"],
            '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n',
            "line 2 of stdin: duplicate id",
            1,
        ),
        (["--prompts", "-"], "\n", "no prompts in stdin", 1),
        (["--prompt", "A", "--suffix", "B", "--var-length"], None, "--var-length and --suffix", 2),
    ],
)
def test_cli_prompt_errors_in_process(ckpt, args, stdin, needle, code):
    r = _cli(["draft", "--model", str(ckpt), *args], input=stdin)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == code and len(err) == 1 and needle in err[0], r.stderr
    assert r.stdout == ""


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    return env


@pytest.mark.parametrize(
    "args,stdin,needle,code",
    [
        (["--prompt", ""], None, "prompt 'p0' is empty", 2),
        (["--prompt", "word " * 40], None, "leave no position to generate in --length 32", 2),
        (["--prompt", "word " * 10, "--suffix", " word" * 25], None, "suffix tokens", 2),
        (
            ["--prompts", "-"],
            '{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": \n',
            "line 2 of stdin: not JSON",
            1,
        ),
    ],
)
def test_cli_bad_prompts_subprocess(ckpt, args, stdin, needle, code):
    r = subprocess.run(
        [sys.executable, "-m", "did_cli.cli", "draft", "--model", str(ckpt), "--device", "cpu", *args],
        input=stdin or "",
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code and r.stdout == "", r.stderr
    assert len(err) == 1 and err[0].startswith("did: error:") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr
