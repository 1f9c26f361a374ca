"""Config files, resuming from a run's saved options, model sizes beyond the presets,
experiment tracking and the warm-up warning: the real commands in-process (tiny model, L = 32,
a slice of the bundled corpus, a few steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import corpus_slice
from typer.testing import CliRunner

from did_cli import cli
from did_cli.commands import evaluate, sample, train
from did_cli.io.packing import prepare

L = 32
APP = cli.build_app()

# a few steps of the tiny model; warm-up inside the run
FAST = dict(
    batch_size=2,
    lr="1e-3",
    warmup=1,
    ema=0.9,
    eval_every=0,
    eval_batches=2,
    save_every=0,
    log_every=1,
    block_sizes=[4, "L"],
    block_weights=[0.5, 0.5],
    quiet=True,
)


def did(*args) -> CliRunner:
    r = CliRunner().invoke(APP, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([str(corpus_slice(root / "slice.jsonl", every=40))], root / "prepared", seq_len=L, progress=False)
    return root / "prepared"


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values) if path.suffix != ".json" else json.dumps(values))
    return path


def weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_config_file_sets_options_flags_override_and_the_run_config_reproduces_the_run(data_dir, tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", dict(FAST, data=str(data_dir), steps=7, seed=3))
    r = did("train", "--config", cfg, "--out", tmp_path / "a", "--steps", 3)  # the flag wins over the file
    assert r.exit_code == 0, r.stderr
    saved = json.loads((tmp_path / "a/config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["lr"] == 1e-3 and saved["train"]["seed"] == 3
    assert saved["block_weights"] == [0.5, 0.5] and saved["options"]["command"] == "train"
    assert saved["options"]["values"]["block_sizes"] == "4,L" and saved["options"]["values"]["steps"] == 3
    # the run folder is itself a --config: the same run, bit for bit
    r = did("train", "--config", tmp_path / "a", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.stderr
    assert_same(
        weights(tmp_path / "a/checkpoints/step-00000003"), weights(tmp_path / "b/checkpoints/step-00000003")
    )
    again = json.loads((tmp_path / "b/config.json").read_text())
    assert again["train"] == dict(saved["train"], out=str(tmp_path / "b"))
    # a JSON file with one section per command: train reads its own
    both = write_config(
        tmp_path / "recipe.json",
        {"train": dict(FAST, data=str(tmp_path / "elsewhere"), steps=3), "draft": {"n": 2}},
    )
    r = did("train", "--config", both, "--out", tmp_path / "c")
    assert r.exit_code == 1 and "--data" in r.stderr and "elsewhere" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "case",
    [
        "unknown",
        "type-int",
        "type-bool",
        "type-float",
        "section",
        "outside",
        "yaml",
        "missing",
        "required",
        "draft-unknown",
        "eval-type",
    ],
)
def test_config_errors_are_one_line_naming_the_key(case, data_dir, tmp_path):
    cmd, body, expect = "train", dict(data=str(data_dir), out=str(tmp_path / "run")), None
    if case == "unknown":
        body["batch_sise"], expect = 2, "'batch_sise'"
    elif case == "type-int":
        body["steps"], expect = "ten", "'steps' must be an integer"
    elif case == "type-bool":
        body["resample"], expect = "yes please", "'resample' must be true or false"
    elif case == "type-float":
        body["lr"], expect = [1, 2], "'lr' must be a number"
    elif case == "section":
        body, expect = {"draft": {"n": 2}}, "no section for did train"
    elif case == "outside":
        body, expect = {"train": {"steps": 2}, "steps": 3}, "'steps' is outside"
    elif case == "required":
        body, expect = {"steps": 2}, "--data"
    elif case == "draft-unknown":
        cmd, body, expect = "draft", {"n": 2, "temperature": 0.9}, "'temperature' for did draft"
    elif case == "eval-type":
        cmd, body, expect = "eval-ppl", {"batch_size": 0}, "'batch_size'"
    path = write_config(tmp_path / "c.yaml", body)
    if case == "yaml":
        path.write_text("steps: [1, 2\n")
        expect = "not valid YAML"
    elif case == "missing":
        path, expect = tmp_path / "nope.yaml", "no such file"
    r = did(cmd, "--config", path)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("did: error:") and expect in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_resume_with_no_other_option_continues_the_run(data_dir, tmp_path):
    base = [
        "--data",
        data_dir,
        "--steps",
        4,
        "--batch-size",
        2,
        "--lr",
        "2e-3",
        "--warmup",
        2,
        "--ema",
        0.9,
        "--eval-every",
        0,
        "--eval-batches",
        2,
        "--save-every",
        2,
        "--seed",
        5,
        "-q",
    ]
    assert did("train", "--out", tmp_path / "a", *base).exit_code == 0
    # a run that stopped after its step-2 checkpoint
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/checkpoints/step-00000004")
    (tmp_path / "b/best.json").unlink(missing_ok=True)
    r = did("train", "--out", tmp_path / "b", "--resume")
    assert r.exit_code == 0, r.stderr
    assert_same(
        weights(tmp_path / "a/checkpoints/step-00000004"), weights(tmp_path / "b/checkpoints/step-00000004")
    )
    # what defines the run may not change
    for flag, value in (("--lr", "1e-2"), ("--layers", 3)):
        r = did("train", "--out", tmp_path / "b", "--resume", flag, value)
        assert (
            r.exit_code == 2 and f"--resume: {flag}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr


@pytest.fixture(scope="module")
def custom_run(data_dir, tmp_path_factory):
    """A model of no preset's size, trained 2 steps from the command line (default --warmup)."""
    run = tmp_path_factory.mktemp("custom") / "run"
    size = [
        "--layers",
        3,
        "--hidden",
        48,
        "--heads",
        4,
        "--mlp-ratio",
        2,
        "--cond-dim",
        16,
        "--dropout",
        0.05,
    ]
    r = did(
        "train",
        "--data",
        data_dir,
        "--out",
        run,
        "--steps",
        2,
        "--batch-size",
        2,
        "--eval-batches",
        2,
        "--eval-every",
        0,
        "-q",
        *size,
    )
    assert r.exit_code == 0, r.stderr
    return run, r.stderr


def test_custom_size_model_trains_saves_and_reloads_without_flags(custom_run):
    from did_cli.api import load_model

    run, stderr = custom_run
    # the default --warmup 2500 exceeds the 2 steps: one warning says so
    warned = [ln for ln in stderr.splitlines() if ln.startswith("did: warning:")]
    assert len(warned) == 1 and "--warmup 2500" in warned[0] and "2 steps" in warned[0], stderr
    model, _ = load_model(run, device="cpu")
    mc = model.config
    assert (
        mc.n_layers,
        mc.hidden_dim,
        mc.n_heads,
        mc.mlp_ratio,
        mc.cond_dim,
        mc.dropout,
        mc.model_length,
    ) == (3, 48, 4, 2, 16, 0.05, L)
    assert len(model.blocks) == 3 and sum(p.numel() for p in model.parameters()) == mc.n_params()
    ckpt = run / "checkpoints/step-00000002"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["n_blocks"] == 3 and saved["hidden_dim"] == 48 and saved["mlp_ratio"] == 2
    stored = weights(ckpt)
    for k, v in model.state_dict().items():
        if "backbone." + k in stored:
            assert torch.equal(v.float(), stored["backbone." + k].float()), k
    assert sum(("backbone." + k) in stored for k in model.state_dict()) >= 3 * 6
    # drafting reads the size from the checkpoint: no size flags
    r = did("draft", "--model", run, "-n", 1, "--length", 16, "--block-size", 4)
    assert r.exit_code == 0 and json.loads(r.stdout.splitlines()[0])["tokens"], r.stderr


def test_eval_ppl_model_prints_one_readable_line(custom_run, data_dir):
    run, _ = custom_run
    r = did("eval-ppl", "--model", run, "--data", data_dir, "--block-size", 4, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert (
        len(lines) == 1 and lines[0].startswith("test NELBO ") and "{" not in r.stderr and r.stdout == ""
    ), r.stderr


def test_finetune_warmup_longer_than_the_run_is_reported(custom_run, data_dir, tmp_path):
    run, _ = custom_run
    r = did(
        "finetune-mixscale",
        "--init",
        run,
        "--data",
        data_dir,
        "--out",
        tmp_path / "ft",
        "--steps",
        1,
        "--batch-size",
        2,
        "--eval-batches",
        2,
        "--warmup",
        10,
        "-q",
    )
    assert r.exit_code == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("did: warning:")]
    assert warned == [
        "did: warning: --warmup 10 is longer than the run's 1 steps: the learning rate stops at 3e-05, "
        "not --lr 0.0003; scale --warmup with --steps (e.g. --warmup 1)"
    ], r.stderr


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--hidden", 50, "--heads", 4], "--hidden 50 is not divisible by --heads 4"),
        (["--hidden", 12, "--heads", 4], "head width must be even"),
        (["--preset", "quick", "--heads", 3], "--hidden 128 is not divisible by --heads 3"),
        (["--layers", 0], "--layers"),
        (["--layers", 2, "--init", "somewhere"], "--layers: the model comes from --init"),
    ],
)
def test_model_size_is_checked_before_any_work(flags, expect, data_dir, tmp_path):
    r = did("train", "--data", data_dir, "--out", tmp_path / "run", *flags)
    assert r.exit_code == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_tensorboard_event_file_holds_the_metrics_and_hyperparameters(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(
        tmp_path / "tb.yaml", dict(FAST, data=str(data_dir), steps=3, eval_every=2, log_with="tensorboard")
    )
    r = did("train", "--config", cfg, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.stderr
    logs = list((tmp_path / "run/logs").rglob("events.out.tfevents.*"))
    assert logs, list((tmp_path / "run").rglob("*"))
    acc = EventAccumulator(str(logs[0].parent)).Reload()
    tags = acc.Tags()["scalars"]
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_ev = [e for e in metrics if e["event"] == "train"]
    eval_ev = [e for e in metrics if e["event"] == "eval" and "val_nelbo" in e]
    assert len(train_ev) == 3 and len(eval_ev) == 3  # steps 0, 2 and 3
    for kind, evs, keys in (
        ("train", train_ev, ("loss", "lr", "tokens_per_s")),
        ("eval", eval_ev, ("val_nelbo", "val_nelbo_b4")),
    ):
        for key in keys:
            got = acc.Scalars(f"{kind}/{key}")
            assert [s.step for s in got] == [e["step"] for e in evs], (kind, key)
            assert [s.value for s in got] == pytest.approx([e[key] for e in evs], rel=1e-6), (kind, key)
    assert "eval/val_nelbo_b32" in tags
    # the hyper-parameters: TensorBoard's hparams plugin data, and Accelerate's hparams.yml beside it
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp = {}
    for sub in (p for p in logs[0].parent.iterdir() if p.is_dir()):
        try:
            content = EventAccumulator(str(sub)).Reload().PluginTagToContent("hparams")
        except KeyError:  # the folder of hparams.yml
            continue
        for raw in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            for k, v in data.session_start_info.hparams.items():
                hp[k] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
    assert hp.get("steps") == 3 and hp.get("log_with") == "tensorboard" and hp.get("model/n_blocks") == 2, hp
    assert hp.get("block_sizes") == "4,L" and hp.get("lr") == pytest.approx(1e-3)
    yml = next(logs[0].parent.rglob("hparams.yml"))
    assert yaml.safe_load(yml.read_text())["steps"] == 3


def test_log_with_unknown_or_uninstalled_tracker_is_one_line(data_dir, tmp_path):
    r = did("train", "--data", data_dir, "--out", tmp_path / "run", "--log-with", "tensorbored")
    assert (
        r.exit_code == 2
        and "--log-with 'tensorbored'" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )
    from accelerate.tracking import get_available_trackers

    absent = [
        t
        for t in ("wandb", "mlflow", "trackio", "aim")
        if t not in {str(x) for x in get_available_trackers()}
    ]
    if not absent:
        pytest.skip("every tracker is installed")
    r = did("train", "--data", data_dir, "--out", tmp_path / "run", "--log-with", absent[0])
    assert r.exit_code == 1 and f"pip install 'did-cli[{absent[0]}]'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_openwebtext_recipe_file_is_valid_for_each_of_its_commands():
    from did_cli.commands import config_file
    from did_cli.commands import prepare as prep

    recipe = Path(__file__).resolve().parents[1] / "examples" / "owt.yaml"
    commands = {
        "prepare": prep.prepare,
        "finetune-mixscale": train.finetune_mixscale,
        "draft": sample.draft,
        "refine": sample.refine,
        "eval-ppl": evaluate.eval_ppl,
    }
    assert set(yaml.safe_load(recipe.read_text())) == set(commands)
    got = {name: config_file.file_values(recipe, name, fn.options) for name, fn in commands.items()}
    assert got["finetune-mixscale"]["lr"] == 3e-4 and got["finetune-mixscale"]["clip"] == "auto"
    assert got["prepare"]["sources"] == ["Skylion007/openwebtext"] and got["refine"]["stages"] == "1024:0.25"
    assert got["eval-ppl"]["inputs"] == ["runs/did-owt/drafts.jsonl", "runs/did-owt/refined.jsonl"]
    # and a command without a section says so
    with pytest.raises(Exception, match="no section for did train"):
        config_file.file_values(recipe, "train", train.train.options)


def test_help_of_each_command_mentions_config():
    for name in ("train", "finetune-mixscale", "draft", "eval-ppl"):
        r = CliRunner().invoke(APP, [name, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "--config" in r.stdout and "YAML or JSON" in r.stdout, (
            name,
            r.stdout[-500:],
        )


def test_resume_of_a_run_without_saved_options_reads_the_flags(data_dir, tmp_path):
    """A run built in Python saves no command-line options: --resume then takes the flags as given."""
    from did_cli.training import TrainConfig
    from did_cli.training import train as run_train

    kw = dict(
        batch_size=2, lr=1e-3, warmup=1, ema=0.9, eval_every=0, eval_batches=1, save_every=0, progress=False
    )
    run_train(TrainConfig(data=str(data_dir), out=str(tmp_path / "py"), steps=2, **kw))
    assert "options" not in json.loads((tmp_path / "py/config.json").read_text())
    r = did(
        "train",
        "--data",
        data_dir,
        "--out",
        tmp_path / "py",
        "--resume",
        "--steps",
        3,
        "--batch-size",
        2,
        "--lr",
        "1e-3",
        "--warmup",
        1,
        "--ema",
        0.9,
        "--eval-every",
        0,
        "--eval-batches",
        1,
        "-q",
    )
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "py/checkpoints/step-00000003").is_dir()
