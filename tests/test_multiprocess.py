"""Two training processes on CPU under `accelerate launch` (docs/reliability.md, "Multi-process").

`accelerate launch --cpu --num_processes 2` starts ONE process here (accelerate hands multi-CPU
jobs to MPI); `--multi_gpu --num_processes 2` on a machine without CUDA starts two processes
that `did train` joins with the gloo back-end. That is the form tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import corpus_slice

from did_cli.io import checkpoint as ck
from did_cli.io.packing import prepare

L = 32
STEPS = 6


def _rows(path: Path) -> dict[int, list[int]]:
    """step -> row indices read by one rank (DID_DEBUG_ROWS dump)."""
    out: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        out.setdefault(e["step"], []).extend(e["rows"])
    return out


def _events(run: Path, kind: str) -> list[dict]:
    return [
        e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind
    ]


@pytest.mark.slow
def test_two_cpu_processes_split_the_data_and_follow_one_process(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    prepare(
        [str(corpus_slice(tmp_path / "slice.jsonl", every=100))], tmp_path / "data", seq_len=L, progress=False
    )
    common = [
        "train",
        "--data",
        str(tmp_path / "data"),
        "--steps",
        str(STEPS),
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--eval-every",
        "0",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--ema",
        "0.9",
        "--block-sizes",
        "4,L",
        "--dropout",
        "0",
        "--seed",
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
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
            *common,
            "--out",
            str(tmp_path / "m"),
            "--batch-size",
            "4",
            "--eval-batches",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "DID_DEBUG_ROWS": str(tmp_path / "rows_m")},
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "did_cli.cli",
            *common,
            "--out",
            str(tmp_path / "s"),
            "--batch-size",
            "8",
            "--eval-batches",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "DID_DEBUG_ROWS": str(tmp_path / "rows_s")},
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads((tmp_path / "m/config.json").read_text())["world_size"] == 2

    # every process reads its own rows; together they are the one-process global batch
    r0, r1 = _rows(tmp_path / "rows_m.rank0"), _rows(tmp_path / "rows_m.rank1")
    rs = _rows(tmp_path / "rows_s.rank0")
    assert sorted(r0) == sorted(r1) == list(range(1, STEPS + 1))
    for step in r0:
        assert len(r0[step]) == len(r1[step]) == 4 and not set(r0[step]) & set(r1[step]), step
        assert sorted(r0[step] + r1[step]) == sorted(rs[step]), step

    # only the main process logs and saves: every event once, one progress line per step
    m, s = _events(tmp_path / "m", "train"), _events(tmp_path / "s", "train")
    assert [e["step"] for e in m] == list(range(1, STEPS + 1))
    assert len(_events(tmp_path / "m", "eval")) == 1
    for step in range(1, STEPS + 1):
        assert multi.stderr.count(f"did train: step {step}/{STEPS} ") == 1, multi.stderr[-3000:]
    assert multi.stderr.count("did: done at step") == 1
    assert [c.name for c in ck.list_checkpoints(tmp_path / "m")] == ["step-00000003", "step-00000006"]
    assert not list((tmp_path / "m/checkpoints").glob(".tmp-*"))
    assert ck.verify_checkpoint(tmp_path / "m/checkpoints/step-00000006") is None

    # the loss curve: equal up to float summation order (same weights, and the same rows in the
    # same order with the same noise)
    for a, b in zip(m, s):
        assert a["block_size"] == b["block_size"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    # the final (EMA) models, scored on the same rows with the same t draws (the logged val NELBO
    # is not comparable: eval batches are per process, so their shapes and t draws differ)
    from did_cli.io.data import PreparedData
    from did_cli.io.model_folder import load_model
    from did_cli.training.val_nelbo import val_nelbo

    rows = torch.from_numpy(
        np.asarray(PreparedData(tmp_path / "data").rows("validation")[:16], dtype=np.int64)
    )
    vm, vs = (
        val_nelbo(load_model(tmp_path / r / "checkpoints/step-00000006")[0], [rows], 4, 50257, seed=0)
        for r in ("m", "s")
    )
    assert vm == pytest.approx(vs, rel=1e-4), (vm, vs)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine an FSDP config is valid")
def test_fsdp_config_without_gpus_is_a_one_line_error(tmp_path):
    """examples/accelerate/fsdp.yaml asks for GPUs; Accelerate refuses FSDP without them, and
    each process says so in one line (exit 1) rather than a traceback, before writing anything."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    prepare(
        [str(corpus_slice(tmp_path / "slice.jsonl", every=100))], tmp_path / "data", seq_len=L, progress=False
    )
    cfg = (Path(__file__).resolve().parents[1] / "examples/accelerate/fsdp.yaml").read_text()
    cfg = cfg.replace("num_processes: 8", "num_processes: 2").replace(
        "mixed_precision: bf16", "mixed_precision: 'no'"
    )
    (tmp_path / "fsdp.yaml").write_text(cfg)
    r = subprocess.run(
        [
            "accelerate",
            "launch",
            "--config_file",
            str(tmp_path / "fsdp.yaml"),
            "-m",
            "did_cli.cli",
            "train",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("did: error: ")]
    assert errors and all("accelerate could not set up this run" in ln and "FSDP" in ln for ln in errors), (
        r.stderr[-2000:]
    )
    # the launcher prints its own traceback of the failed children; none comes from our code
    assert "did_cli" + os.sep not in r.stderr and "RuntimeError" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run").exists()
