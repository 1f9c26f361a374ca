"""FSDP that trains, on a CPU: two gloo processes (tests/fsdp_worker.py) wrap the model as
Accelerate's FSDP plugin would (FSDP1 auto-wrapping the block class with `use_orig_params`, and
FSDP2 `fully_shard`) and run the trainer's own step, EMA, checkpoint and resume. Two processes
of batch 4 read the same rows with the same noise as one process of batch 8, so their weights
(raw and EMA) must equal the one-process run's, and their checkpoints load into one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import corpus_slice

from did_cli.io import checkpoint as ck
from did_cli.io.packing import prepare
from did_cli.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
L = 32
# rounding of the averaged gradient (summed in another order; the FSDP2 run also takes the loss
# in chunks) through 4 Adam steps at lr 1e-3: observed up to 5e-7 (2.1e-6 chunked) on weights
# that moved by ~2e-3 per 2 steps
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, data: Path, out: Path, copy: Path) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [sys.executable, str(HERE / "fsdp_worker.py"), mode, str(data), str(out), str(copy)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]


def _weights(ckpt: Path) -> tuple[dict, dict]:
    raw = load_file(str(ckpt / ck.STATE_DIR / "raw_model.safetensors"))
    ema = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if v.dim() > 0}
    return raw, ema


def _train_events(run: Path) -> list[dict]:
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "train"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (batch 8) and the data every run reads."""
    from fsdp_worker import config

    root = tmp_path_factory.mktemp("fsdp")
    prepare([str(corpus_slice(root / "slice.jsonl", every=100))], root / "data", seq_len=L, progress=False)
    Trainer(config(str(root / "data"), str(root / "ref"), 4, 8)).setup().fit()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2", "ddp"])
def test_sharded_training_equals_one_process_and_resumes(runs, mode):
    from fsdp_worker import config

    out, copy = runs / mode, runs / f"{mode}-copy"
    _launch(mode, runs / "data", out, copy)
    figures = {}
    for step in (2, 4):  # step 4 was reached through a resume (sharded, for FSDP) from step 2
        name = f"step-{step:08d}"
        raw, ema = _weights(out / "checkpoints" / name)
        ref_raw, ref_ema = _weights(runs / "ref/checkpoints" / name)
        moved = _max_diff(raw, _weights(runs / "ref/checkpoints/step-00000002")[0]) if step == 4 else None
        figures[step] = (_max_diff(raw, ref_raw), _max_diff(ema, ref_ema), moved)
        print(
            f"{mode} step {step}: max |weights - one process's| raw {figures[step][0]:.2e}, "
            f"EMA {figures[step][1]:.2e}"
        )
        assert figures[step][0] < ATOL and figures[step][1] < ATOL, (step, figures)
        assert ck.verify_checkpoint(out / "checkpoints" / name) is None
    assert figures[4][2] > 100 * ATOL  # the weights did move between the checkpoints
    losses = [(e["loss"], r["loss"]) for e, r in zip(_train_events(out), _train_events(runs / "ref"))]
    assert len(losses) == 4 and all(abs(a - b) < 1e-5 * b for a, b in losses), losses
    print(f"{mode}: weights moved by up to {figures[4][2]:.2e} from step 2 to 4; losses {losses}")

    # the optimiser state, keyed by parameter name, is the one-process run's
    opt = ck.torch_load(out / "checkpoints/step-00000002" / ck.STATE_DIR / "optimizer.pt")
    ref = ck.torch_load(runs / "ref/checkpoints/step-00000002" / ck.STATE_DIR / "optimizer.pt")
    assert opt["state"].keys() == ref["state"].keys() and "blocks.0.attn_qkv.weight" in opt["state"]
    for name, s in ref["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt["state"][name][k], s[k], atol=1e-6, rtol=1e-3)

    # the sharded checkpoint resumes in one process (the world size changes, with a warning)
    single = Trainer(config(str(runs / "data"), str(copy), 3, 4, resume=True)).setup()
    raw, ema = _weights(copy / "checkpoints/step-00000002")
    got = {"backbone." + k: v for k, v in single.unwrapped.state_dict().items()}
    assert _max_diff(got, raw) == 0.0
    got = {"backbone." + k: v for k, v in single.ema.full_model(single.model).state_dict().items()}
    assert _max_diff(got, ema) == 0.0
    state = single.optimizer.state_dict()["state"]
    names = single.param_names
    for i, s in state.items():
        torch.testing.assert_close(s["exp_avg"], opt["state"][names[i]]["exp_avg"], atol=0, rtol=0)
    assert single.fit()["step"] == 3


@pytest.mark.parametrize("name, version", [("fsdp.yaml", 1), ("fsdp2.yaml", 2)])
def test_shipped_fsdp_configs_wrap_each_backbones_layers(name, version, monkeypatch):
    """The files Accelerate reads for a GPU launch: the right FSDP version, `use_orig_params` for
    FSDP1, and the auto-wrap class taken from the model (DiTBlock, LlamaLayer), not named."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from llama_helpers import tiny_llama

    from did_cli.core.dit import DiT, DiTBlock
    from did_cli.core.llama import LlamaLayer
    from did_cli.core.model_config import preset

    path = HERE.parent / "examples/accelerate" / name
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    env["FSDP_SYNC_MODULE_STATES"] = "false"  # the plugin refuses it without a GPU
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for model, unit in ((DiT(preset("tiny", model_length=32)), DiTBlock), (tiny_llama(), LlamaLayer)):
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == version
        assert version == 2 or plugin.use_orig_params
        plugin.set_auto_wrap_policy(model)
        assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {unit}
