"""Training: it learns, it resumes bit-exactly, it refuses bad input in one line, and a run
folder holds what docs/train.md promises. Tiny model, L = 32, a slice of the bundled corpus."""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from did_cli.errors import DidError
from did_cli.io import checkpoint as ck
from did_cli.io.model_folder import load_model
from did_cli.io.packing import prepare
from did_cli.io.sources import BUNDLED_CORPUS
from did_cli.training import TrainConfig, train

L = 32


def corpus_slice(path: Path, every: int = 20) -> Path:
    """Every `every`-th Wikipedia intro of the bundled corpus (~250 KB at 20). One source only, so
    that the validation documents (the last ones) come from the training distribution."""
    lines = [
        ln
        for ln in lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8").read().splitlines()
        if json.loads(ln)["source"].startswith("wikipedia:")
    ]
    path.write_text("\n".join(lines[::every]) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([str(corpus_slice(root / "slice.jsonl"))], root / "prepared", seq_len=L, progress=False)
    return root / "prepared"


def quick(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        block_sizes=[4, "L"],
        block_weights=[0.5, 0.5],
        steps=4,
        batch_size=2,
        lr=3e-3,
        warmup=2,
        ema=0.9,
        eval_every=0,
        eval_batches=2,
        save_every=0,
        log_every=1,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def events(run: Path, kind: str) -> list[dict]:
    return [
        e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind
    ]


def did(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "did_cli.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_training_lowers_validation_nelbo_and_writes_a_run_folder(data_dir, tmp_path):
    run = tmp_path / "run"
    result = train(
        quick(
            data_dir,
            run,
            block_sizes=[4],
            block_weights=None,
            steps=30,
            batch_size=8,
            warmup=5,
            eval_every=15,
            eval_batches=4,
            save_every=15,
            log_every=5,
        )
    )
    evals = events(run, "eval")
    start, end = evals[0]["val_nelbo_b4"], evals[-1]["val_nelbo_b4"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    # observed: ~10.3 -> ~8.0 nats/token
    assert end < 0.9 * start, (start, end)
    assert result["val_nelbo_b4"] == pytest.approx(end)

    # run folder layout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 30 and cfg["model"]["model_length"] == L and cfg["block_sizes"] == [4]
    trains = events(run, "train")
    assert [e["step"] for e in trains] == [5, 10, 15, 20, 25, 30]
    assert all({"loss", "block_size", "tokens_per_s", "lr", "time"} <= set(e) for e in trains)
    assert {"val_nelbo", "val_ppl", "val_nelbo_b4", "val_ppl_b4"} <= set(evals[-1])
    # every validation NELBO carries its standard error (over the rows; 4 batches of 8 rows)
    assert evals[-1]["val_rows"] == 32 and evals[-1]["val_draws_b4"] == 1
    assert 0 < evals[-1]["val_nelbo_se_b4"] < 1 and 0 < evals[-1]["val_nelbo_se"] < 1
    ckpts = ck.list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step-00000015", "step-00000030"]
    last = ckpts[-1]
    for rel in (
        "config.json",
        "model.safetensors",
        "manifest.json",
        "train_state/raw_model.safetensors",
        "train_state/optimizer.pt",
        "train_state/scheduler.pt",
        "train_state/rng.pt",
        "train_state/state.json",
    ):
        assert (last / rel).is_file(), rel
    assert ck.verify_checkpoint(last) is None
    assert ck.resolve_checkpoint(run) == last
    best = json.loads((run / "best.json").read_text())
    assert (run / "checkpoints" / best["checkpoint"]).is_dir() and best["val_nelbo"] == pytest.approx(
        min(e["val_nelbo"] for e in evals[1:])
    )

    # model.safetensors alone is the EMA model; it is not the raw one
    model, info = load_model(last)
    assert model.config.model_length == L and info["clip"] == (0.0, 1.0)
    raw = load_file(str(last / "train_state/raw_model.safetensors"))
    ema = load_file(str(last / "model.safetensors"))
    assert set(raw) <= set(ema) and not torch.equal(
        raw["backbone.blocks.0.attn_qkv.weight"], ema["backbone.blocks.0.attn_qkv.weight"]
    )
    state = json.loads((last / "train_state/state.json").read_text())
    assert state["step"] == 30 and state["rows_per_step"] == 8 and "block_sampler" in state


def test_resume_is_bit_exact(data_dir, tmp_path):
    kw = dict(
        steps=6,
        save_every=3,
        eval_every=3,
        dropout=0.1,
        block_sizes=[4, 8, "L"],
        block_weights=[0.5, 0.3, 0.2],
    )
    train(quick(data_dir, tmp_path / "a", **kw))
    train(quick(data_dir, tmp_path / "b", **{**kw, "steps": 3}))
    train(quick(data_dir, tmp_path / "b", resume=True, **kw))
    for rel in ("model.safetensors", "train_state/raw_model.safetensors"):
        a = load_file(str(tmp_path / "a/checkpoints/step-00000006" / rel))
        b = load_file(str(tmp_path / "b/checkpoints/step-00000006" / rel))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (rel, k)
    sa = json.loads((tmp_path / "a/checkpoints/step-00000006/train_state/state.json").read_text())
    sb = json.loads((tmp_path / "b/checkpoints/step-00000006/train_state/state.json").read_text())
    assert sa["block_sampler"] == sb["block_sampler"] and sa["position"] == sb["position"]
    # a resume that changes the data order is refused
    with pytest.raises(Exception, match="--batch-size"):
        train(quick(data_dir, tmp_path / "b", resume=True, **{**kw, "steps": 8, "batch_size": 3}))


def test_nonfinite_loss_stops_or_skips(data_dir, tmp_path):
    # an absurd learning rate blows the weights up within a few updates
    bad = dict(lr=1e30, warmup=0, grad_clip=0, steps=6, save_every=1)
    with pytest.raises(DidError, match=r"non-finite loss at step (\d+)") as err:
        train(quick(data_dir, tmp_path / "stop", **bad))
    failed = int(re.search(r"step (\d+)", str(err.value)).group(1))
    assert 2 <= failed <= 6
    kept = ck.resolve_checkpoint(tmp_path / "stop")
    assert ck.step_of(kept) == failed - 1 and str(kept) in str(err.value)
    result = train(quick(data_dir, tmp_path / "skip", on_nonfinite="skip", **bad))
    skipped = [e["step"] for e in events(tmp_path / "skip", "skip")]
    assert result["step"] == 6 and skipped and skipped == list(range(skipped[0], 7))


@pytest.mark.parametrize(
    "case",
    ["missing-data", "block-not-dividing", "weights-mismatch", "clip-range", "other-tokenizer"],
)
def test_cli_bad_input_is_one_line(case, data_dir, tmp_path):
    args = [
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]
    expect_code, expect_text = 2, None
    if case == "missing-data":
        args[2] = str(tmp_path / "nope")
        expect_code, expect_text = 1, "nope"
    elif case == "block-not-dividing":
        args += ["--block-sizes", "5,L"]
        expect_text = "--block-sizes"
    elif case == "weights-mismatch":
        args += ["--block-sizes", "4,8,L", "--block-weights", "0.5,0.5"]
        expect_text = "--block-weights"
    elif case == "clip-range":
        args += ["--clip", "0.5,1.5"]
        expect_text = "--clip"
    else:
        from did_cli.core.dit import DiT
        from did_cli.core.model_config import preset
        from did_cli.io.model_folder import save_model

        save_model(DiT(preset("tiny", model_length=L, tokenizer="bert-base-uncased")), tmp_path / "bert")
        args += ["--init", str(tmp_path / "bert")]
        expect_code, expect_text = 1, "bert-base-uncased"
    r = did(*args)
    assert r.returncode == expect_code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expect_text in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ctrl_c_saves_and_exits_130(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "did_cli.cli",
            "train",
            "--data",
            str(data_dir),
            "--out",
            str(run),
            "--steps",
            "1000",
            "--batch-size",
            "2",
            "--log-every",
            "1",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--warmup",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    for line in proc.stderr:
        if "step 2/1000" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "Traceback" not in rest and "interrupted" in rest
    ckpt = ck.resolve_checkpoint(run)
    step = json.loads((ckpt / "train_state/state.json").read_text())["step"]
    assert 2 <= step < 1000


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(data_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): rank 0 alone writes, and the loss curve
    follows a 1-process run with the same global batch: same rows, same masking noise (it belongs
    to the global batch); only float summation order differs (dropout off)."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    common = [
        "--data",
        str(data_dir),
        "--steps",
        "8",
        "--lr",
        "3e-3",
        "--warmup",
        "4",
        "--eval-every",
        "0",
        "--eval-batches",
        "4",
        "--log-every",
        "1",
        "--ema",
        "0.9",
        "--block-sizes",
        "4,L",
        "--dropout",
        "0",
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run(
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "did_cli.cli",
            "train",
            "--out",
            str(tmp_path / "m"),
            "--batch-size",
            "4",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert multi.returncode == 0, multi.stderr[-2000:]
    single = did("train", "--out", str(tmp_path / "s"), "--batch-size", "8", *common, timeout=600)
    assert single.returncode == 0, single.stderr
    assert json.loads((tmp_path / "m/config.json").read_text())["world_size"] == 2
    m, s = events(tmp_path / "m", "train"), events(tmp_path / "s", "train")
    assert [e["step"] for e in m] == list(range(1, 9))  # logged once, by rank 0
    assert [c.name for c in ck.list_checkpoints(tmp_path / "m")] == ["step-00000008"]
    assert not list((tmp_path / "m/checkpoints").glob(".tmp-*"))
    assert m[0]["loss"] == pytest.approx(s[0]["loss"], rel=1e-5)  # same weights, rows and noise
    # observed: later steps within ~2% (Adam amplifies rounding differences of the gradient mean)
    for a, b in zip(m, s):
        assert a["block_size"] == b["block_size"]
        assert abs(a["loss"] - b["loss"]) < 0.05 * b["loss"], (a, b)
    vm, vs = events(tmp_path / "m", "eval")[-1]["val_nelbo"], events(tmp_path / "s", "eval")[-1]["val_nelbo"]
    assert abs(vm - vs) < 0.03 * vs, (vm, vs)
