"""Checkpoint folders: atomic writes, damage detection with fallback, safe state loading, pruning."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_train import corpus_slice

from did_cli.errors import DidError
from did_cli.io import checkpoint as ck
from did_cli.io.model_folder import load_model
from did_cli.io.packing import prepare
from did_cli.training import TrainConfig, train


@pytest.fixture(scope="module")
def run3(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 1, 2 and 3."""
    root = tmp_path_factory.mktemp("ckpt")
    prepare([str(corpus_slice(root / "slice.jsonl", every=100))], root / "data", seq_len=32, progress=False)
    train(
        TrainConfig(
            data=str(root / "data"),
            out=str(root / "run"),
            block_sizes=[4],
            block_weights=None,
            steps=3,
            batch_size=2,
            lr=1e-3,
            warmup=1,
            ema=0.9,
            eval_every=0,
            eval_batches=2,
            save_every=1,
            log_every=1,
            progress=False,
        )
    )
    return root / "run"


@pytest.fixture
def run(run3, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run3, dst)
    return dst


def test_leftover_temporary_folder_is_ignored(run):
    tmp = run / "checkpoints" / ".tmp-step-00000009"
    shutil.copytree(run / "checkpoints" / "step-00000003", tmp)
    (tmp / "manifest.json").unlink()  # a crash before the manifest
    assert ck.resolve_checkpoint(run).name == "step-00000003"
    # a folder with a real name but no manifest is incomplete too
    shutil.copytree(tmp, run / "checkpoints" / "step-00000010")
    assert ck.resolve_checkpoint(run).name == "step-00000003"


def test_damaged_latest_falls_back_with_a_warning(run, capfd):
    latest = run / "checkpoints" / "step-00000003"
    weights = latest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert ck.verify_checkpoint(latest) is not None
    assert ck.resolve_checkpoint(run).name == "step-00000002"
    err = capfd.readouterr().err
    assert "step-00000003" in err and "warning" in err
    # a flipped byte of the same size is caught by the hash
    prev = run / "checkpoints" / "step-00000002" / "train_state" / "optimizer.pt"
    data = bytearray(prev.read_bytes())
    data[-10] ^= 0xFF
    prev.write_bytes(bytes(data))
    assert ck.resolve_checkpoint(run).name == "step-00000001"
    # naming the damaged folder itself is an error, not a silent load
    with pytest.raises(DidError, match="damaged"):
        ck.resolve_checkpoint(latest)
    # and resume continues from the good one
    cfg = json.loads((run / "config.json").read_text())["train"]
    cfg.update(out=str(run), resume=True, steps=4, save_every=0)
    cfg["betas"] = tuple(cfg["betas"])
    result = train(TrainConfig(**cfg))
    assert result["step"] == 4
    state = json.loads((run / "checkpoints/step-00000004/train_state/state.json").read_text())
    assert state["step"] == 4


def test_training_state_is_loaded_with_weights_only(run):
    ckpt = ck.resolve_checkpoint(run)
    st = ckpt / "train_state"
    opt = torch.load(st / "optimizer.pt", weights_only=True)
    assert set(opt) == {"state", "param_groups"} and opt["param_groups"][0]["lr"] > 0
    sched = torch.load(st / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 3
    rng = torch.load(st / "rng.pt", weights_only=True)
    assert isinstance(rng["torch"], torch.Tensor) and len(rng["python"][1]) == 625
    # anything beyond tensors and plain containers is refused, not executed
    evil = st / "optimizer.pt"
    evil.write_bytes(pickle.dumps(Path("/etc/passwd"), protocol=2))
    with pytest.raises(DidError, match="cannot read training state"):
        ck.torch_load(evil)


def test_manifest_lists_every_file_and_model_loads_alone(run):
    ckpt = ck.resolve_checkpoint(run)
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {
        p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    assert set(files) == on_disk
    solo = run.parent / "solo"
    solo.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / name, solo / name)
    model, info = load_model(solo)
    assert ck.resolve_checkpoint(solo) == solo and model.config.model_length == 32


def test_prune_keeps_the_last_n_and_the_best(run):
    ck.write_best(run, run / "checkpoints" / "step-00000001", {"step": 1, "val_nelbo": 1.0})
    deleted = ck.prune_checkpoints(run, keep_last=1)
    assert [p.name for p in deleted] == ["step-00000002"]
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000001", "step-00000003"]
    assert ck.resolve_checkpoint(run, which="best").name == "step-00000001"
    assert ck.resolve_checkpoint(run / "best").name == "step-00000001"
    assert ck.resolve_checkpoint(run / "latest").name == "step-00000003"


def test_no_checkpoint_is_an_error(tmp_path):
    with pytest.raises(DidError, match="no checkpoint in"):
        ck.resolve_checkpoint(tmp_path)
