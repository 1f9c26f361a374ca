"""`did eval-ppl --model --data`: the NELBO bound of a checkpoint on a prepared split."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from test_train import corpus_slice

from did_cli.core.dit import DiT
from did_cli.core.model_config import preset
from did_cli.io.model_folder import save_model
from did_cli.io.packing import prepare
from did_cli.training import TrainConfig, train

L = 32
pytestmark = pytest.mark.slow  # trains a model in its fixture


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tppl")
    prepare([str(corpus_slice(root / "slice.jsonl", every=10))], root / "data", seq_len=L, progress=False)
    train(
        TrainConfig(
            data=str(root / "data"),
            out=str(root / "run"),
            block_sizes=[4, "L"],
            block_weights=[0.5, 0.5],
            steps=60,
            batch_size=8,
            lr=3e-3,
            warmup=5,
            ema=0.0,
            eval_every=0,
            eval_batches=2,
            save_every=0,
            progress=False,
        )
    )
    untrained = root / "untrained"
    save_model(DiT(preset("tiny", model_length=L)), untrained)
    return root


def _eval(model, data, *extra):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "did_cli.cli",
            "eval-ppl",
            "--model",
            str(model),
            "--data",
            str(data),
            "--json",
            "-",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("block", ["4", str(L)])
def test_trained_checkpoint_has_lower_finite_test_ppl(trained, block):
    good = _eval(trained / "run", trained / "data", "--block-size", block)
    bad = _eval(trained / "untrained", trained / "data", "--block-size", block)
    for res in (good, bad):
        assert res["block_size"] == int(block) and res["split"] == "validation"
        assert res["tokens"] == res["rows"] * (L - 1)  # BOS excluded
        assert res["ppl"] == pytest.approx(math.exp(res["nelbo"]), rel=1e-9)
        assert res["bits_per_token"] == pytest.approx(res["nelbo"] / 0.6931471805599453, rel=1e-9)
        # a standard error and the interval of the bound it implies
        assert 0 < res["nelbo_se"] < 0.5 and res["ppl_ci95"][0] < res["ppl"] < res["ppl_ci95"][1]
        assert (
            res["draws"] == (2 if block == str(L) else 1)
            and res["weight"] == "posterior"
            and res["row_layout"] == "bos"
        )
    assert 0 < good["nelbo"] < bad["nelbo"] - 0.5


def test_block_size_must_divide_the_length(trained):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "did_cli.cli",
            "eval-ppl",
            "--model",
            str(trained / "run"),
            "--data",
            str(trained / "data"),
            "--block-size",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--block-size 5" in r.stderr and "Traceback" not in r.stderr
