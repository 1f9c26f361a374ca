"""The Python API: the example in docs/python-api.md runs, `import did_cli` stays light, and the
API gives the records the library (and so the CLI) gives."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_model

import did_cli
from did_cli.errors import UsageError
from did_cli.io.model_folder import save_model
from did_cli.sampling import DraftConfig, draft

L = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api") / "m"
    save_model(tiny_model(length=L, seed=3, std=0.08), folder)
    return folder


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from did_cli.io.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("scorer")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=50257)
    ).save_pretrained(d)
    load_tokenizer("gpt2").hf.save_pretrained(d)
    return d


def test_docs_example_runs(ckpt, scorer_dir, monkeypatch, capsys):
    text = (REPO / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "no python block in docs/python-api.md"
    monkeypatch.setenv("DID_MODEL", str(ckpt))
    monkeypatch.setenv("DID_SCORER", str(scorer_dir))
    for code in blocks:
        exec(compile(code, "docs/python-api.md", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert "gen PPL" in out and "draft-0-3" in out


def test_import_is_light_and_api_is_lazy():
    # the API module itself imports torch only inside its functions
    code = (
        "import sys, did_cli; assert 'torch' not in sys.modules; f = did_cli.draft; "
        "assert f.__module__ == 'did_cli.api' and 'torch' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError):
        did_cli.no_such_name  # noqa: B018


def test_api_equals_library(ckpt):
    model, tok = did_cli.load_model(ckpt, device="cpu")
    kw = dict(length=16, block_size=4, top_p=1.0, seed=4)
    a = did_cli.draft(model, n=2, prompt=[11, 12, 13], suffix=" end", tokenizer=tok, **kw)
    b = list(
        draft(
            model,
            DraftConfig(n=2, prompts=[[11, 12, 13]], suffix=" end", **kw),
            tokenizer=tok,
            progress=False,
            model_path=str(ckpt),
        )
    )
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert a[0]["model"]["path"] == str(ckpt)
    # a list of ints is one prompt, a list of strings several
    assert len(did_cli.draft(model, n=1, prompt=["A", "B"], tokenizer=tok, **kw)) == 2
    with pytest.raises(UsageError, match="unknown DraftConfig setting 'blocksize'"):
        did_cli.draft(model, n=1, blocksize=4)
