"""Mix-scale fine-tuning: the block-size sampler, BD3-LM-format --init, --clip auto, and the
effect of mixing the global block into a model trained only at block 4."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_train import corpus_slice, events

from did_cli.io.packing import prepare
from did_cli.training import TrainConfig, train
from did_cli.training.state import BlockSizeSampler, RowSchedule

L = 32


def did(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "did_cli.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ftdata")
    prepare([str(corpus_slice(root / "slice.jsonl", every=10))], root / "prepared", seq_len=L, progress=False)
    return root / "prepared"


COMMON = dict(batch_size=8, ema=0.0, eval_batches=4, save_every=0, log_every=10, progress=False)


def copy_corpus(path: Path, n_docs: int = 4000) -> Path:
    """Documents that repeat a random 8-word phrase four times: a masked word is predictable
    from its copies 8 positions away. A model trained at block 4 learns to copy only from the
    clean blocks to its left; at block = length every copy is itself noisy, which it has never
    had to use. Real text at this model size shows little of that gap (the model barely uses
    context), so this corpus makes the effect of the global block measurable in a minute."""
    words = (
        "the of and to in is was for on that with as by at from his her an were are which this be or has "
        "had not but their its first one two new after also who they time year city people world"
    ).split()
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n_docs):
            phrase = " ".join(rng.choice(words, 8))
            f.write(json.dumps({"text": " " + " ".join([phrase] * 4)}) + "\n")
    return path


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("copydata")
    prepare([str(copy_corpus(root / "docs.jsonl"))], root / "prepared", seq_len=L, progress=False)
    return root / "prepared"


def _base(data: Path, out: Path, steps: int) -> Path:
    """A tiny model trained at block size 4 only (no EMA: evaluated weights = trained weights)."""
    train(
        TrainConfig(
            data=str(data),
            out=str(out),
            block_sizes=[4],
            block_weights=None,
            steps=steps,
            lr=3e-3,
            warmup=5,
            eval_every=0,
            **COMMON,
        )
    )
    return out


def _finetunes(base: Path, data: Path, tmp: Path, steps: int) -> dict[str, tuple[dict, dict]]:
    """(first, last) eval of a mix-scale fine-tune and of the same fine-tune at block 4 alone
    (the paper's "small blocks only" ablation), both reading on where the base stopped."""
    runs = {}
    for name, weights in (("mix", [0.5, 0.5]), ("b4only", [1.0, 0.0])):
        out = tmp / name
        train(
            TrainConfig(
                data=str(data),
                out=str(out),
                init=str(base),
                block_sizes=[4, "L"],
                block_weights=weights,
                steps=steps,
                lr=1e-3,
                warmup=5,
                eval_every=steps,
                **COMMON,
            )
        )
        assert json.loads((out / "config.json").read_text())["data_start"] is not None
        ev = events(out, "eval")
        runs[name] = (ev[0], ev[-1])
    bl = f"val_nelbo_b{L}"
    (before, mix), (_, ctl) = runs["mix"], runs["b4only"]
    print(
        f"block L: {before[bl]:.3f} -> mix {mix[bl]:.3f} / b4-only {ctl[bl]:.3f}; "
        f"block 4: {before['val_nelbo_b4']:.3f} -> mix {mix['val_nelbo_b4']:.3f} / b4-only "
        f"{ctl['val_nelbo_b4']:.3f}"
    )
    return runs


def test_block_size_sampler_follows_weights_and_resumes():
    s = BlockSizeSampler([4, 16, 64], [0.7, 0.2, 0.1], seed=3)
    draws = np.array([s.draw() for _ in range(20_000)])
    for size, w in ((4, 0.7), (16, 0.2), (64, 0.1)):
        assert abs((draws == size).mean() - w) < 0.01
    state = s.state_dict()
    ahead = [s.draw() for _ in range(50)]
    t = BlockSizeSampler([4, 16, 64], [0.7, 0.2, 0.1], seed=3)
    t.load_state_dict(json.loads(json.dumps(state)))  # survives state.json
    assert [t.draw() for _ in range(50)] == ahead
    # a zero weight is never drawn
    z = BlockSizeSampler([4, 32], [1.0, 0.0], seed=0)
    assert {z.draw() for _ in range(1000)} == {4}


def test_row_schedule_reads_on_from_another_run():
    first = RowSchedule(100, 4, 1, 1, seed=5)
    seen = np.concatenate([first.indices(k, 0, 0) for k in range(5)])  # 20 rows of epoch 0
    then = RowSchedule(100, 3, 1, 1, seed=5)  # another batch size
    then.start_at(*first.position(5))
    assert then.position(0) == (0, 21)  # rounded up to a whole step of 3
    rest = np.concatenate([then.indices(k, 0, 0) for k in range(then.steps_per_epoch - 7)])
    assert len(rest) == 78 and not set(rest.tolist()) & set(seen.tolist())
    assert then.position(then.steps_per_epoch - 7) == (1, 0)
    late = RowSchedule(100, 4, 1, 1, seed=5)
    late.start_at(3, 98)  # past the last whole step of epoch 3: the next epoch
    assert late.position(0) == (4, 0)


def _rows_read(path: Path) -> list[int]:
    return [r for line in path.read_text().splitlines() for r in json.loads(line)["rows"]]


def test_finetune_on_the_same_data_reads_on_where_init_stopped(data_dir, tmp_path, monkeypatch):
    """--init from our run on the same rows with the same seed does not re-read its rows first;
    with another seed (its own order) or other data, the fine-tune starts its order at 0."""
    kw = dict(
        COMMON,
        batch_size=4,
        eval_every=0,
        eval_batches=1,
        block_sizes=[4],
        block_weights=None,
        lr=1e-3,
        warmup=1,
    )
    monkeypatch.setenv("DID_DEBUG_ROWS", str(tmp_path / "base_rows"))
    train(TrainConfig(data=str(data_dir), out=str(tmp_path / "base"), steps=3, **kw))
    base_rows = _rows_read(tmp_path / "base_rows.rank0")
    for name, seed in (("same", 0), ("other", 1)):
        monkeypatch.setenv("DID_DEBUG_ROWS", str(tmp_path / f"{name}_rows"))
        train(
            TrainConfig(
                data=str(data_dir),
                out=str(tmp_path / name),
                init=str(tmp_path / "base"),
                steps=2,
                seed=seed,
                **{**kw, "batch_size": 2},
            )
        )
    same, other = _rows_read(tmp_path / "same_rows.rank0"), _rows_read(tmp_path / "other_rows.rank0")
    cfg = json.loads((tmp_path / "same/config.json").read_text())
    assert cfg["data_start"] == [0, 12]
    assert not set(same) & set(base_rows)
    n_rows = json.loads((tmp_path / "base/config.json").read_text())["data"]["splits"]["train"]["rows"]
    order = RowSchedule(n_rows, 2, 1, 1, seed=0)
    order.start_at(0, 12)
    assert same == sorted(order.indices(0, 0, 0).tolist()) + sorted(order.indices(1, 0, 0).tolist())
    assert json.loads((tmp_path / "other/config.json").read_text())["data_start"] is None
    fresh = RowSchedule(n_rows, 2, 1, 1, seed=1)
    assert other == fresh.indices(0, 0, 0).tolist() + fresh.indices(1, 0, 0).tolist()


@pytest.mark.slow
def test_mixscale_finetune_teaches_a_block4_model_the_global_block(copy_data, tmp_path):
    """From a model trained only at block 4, a short fine-tune with the global block in the mix
    lowers the block-L NELBO clearly and keeps the block-4 NELBO where it was."""
    base = _base(copy_data, tmp_path / "base", steps=500)
    runs = _finetunes(base, copy_data, tmp_path, steps=100)
    bl = f"val_nelbo_b{L}"
    (before, mix), (_, ctl) = runs["mix"], runs["b4only"]
    # observed: block L 3.487 -> mix 3.093 / b4-only 3.312; block 4 2.290 -> 2.206 / 2.211. With
    # other seeds (and a variant of this corpus) the mix lowered block L by 0.21-0.37 and never
    # raised block 4, while the block-4-only control moved block L by +0.09 to -0.20.
    assert mix[bl] < before[bl] - 0.15
    assert mix["val_nelbo_b4"] < before["val_nelbo_b4"] + 0.05
    assert mix[bl] < ctl[bl] + 0.05  # the global block in the mix never costs block L


@pytest.mark.slow
def test_mixscale_finetune_on_real_text_keeps_both_block_sizes(data_dir, tmp_path):
    """The same on Wikipedia text: the block-L NELBO falls, block 4 does not rise. At this size
    a block-4-only fine-tune lowers block L about as much (the model barely uses context), so
    this one checks only that mixing costs neither."""
    base = _base(data_dir, tmp_path / "base", steps=150)
    (before, mix), _ = _finetunes(base, data_dir, tmp_path, steps=60).values()
    # observed: block L 8.303 -> 8.179, block 4 7.212 -> 7.133 (b4-only: 8.170, 7.085)
    assert mix[f"val_nelbo_b{L}"] < before[f"val_nelbo_b{L}"] - 0.05
    assert mix["val_nelbo_b4"] < before["val_nelbo_b4"] + 0.05


def bd3lm_folder(folder: Path, clip=(0.45, 0.95), rename=None, reshape=None) -> Path:
    """A BD3-LM-format checkpoint with tiny dims: public tensor names and shapes
    (REFERENCE.md section 2), its config keys, and remote-code files that must never run."""
    d, nb, h, c, V = 64, 2, 2, 32, 50258
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).float()

    t = {
        "backbone.vocab_embed.embedding": r(V, d),
        "backbone.sigma_map.mlp.0.weight": r(c, 256),
        "backbone.sigma_map.mlp.0.bias": r(c),
        "backbone.sigma_map.mlp.2.weight": r(c, c),
        "backbone.sigma_map.mlp.2.bias": r(c),
        "backbone.rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, d // h, 2).float() / (d // h))),
        "backbone.output_layer.norm_final.weight": torch.ones(d),
        "backbone.output_layer.linear.weight": r(V, d),
        "backbone.output_layer.linear.bias": r(V),
        "backbone.output_layer.adaLN_modulation.weight": r(2 * d, c),
        "backbone.output_layer.adaLN_modulation.bias": r(2 * d),
        "sampling_eps_min": torch.tensor(clip[0], dtype=torch.float64),
        "sampling_eps_max": torch.tensor(clip[1], dtype=torch.float64),
    }
    for i in range(nb):
        p = f"backbone.blocks.{i}."
        t.update(
            {
                p + "norm1.weight": torch.ones(d),
                p + "norm2.weight": torch.ones(d),
                p + "attn_qkv.weight": r(3 * d, d),
                p + "attn_out.weight": r(d, d),
                p + "mlp.0.weight": r(4 * d, d),
                p + "mlp.0.bias": r(4 * d),
                p + "mlp.2.weight": r(d, 4 * d),
                p + "mlp.2.bias": r(d),
                p + "adaLN_modulation.weight": r(6 * d, c),
                p + "adaLN_modulation.bias": r(6 * d),
            }
        )
    if rename:
        t[rename[1]] = t.pop(rename[0])
    if reshape:
        t[reshape] = t[reshape][..., :-1].contiguous()
    folder.mkdir(parents=True)
    save_file(t, str(folder / "model.safetensors"))
    marker = folder.parent / "remote-code-ran"
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["BD3LM"],
                "model_type": "bd3lm",
                "auto_map": {"AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
                "block_size": 4,
                "vocab_size": V,
                "model_length": L,
                "hidden_dim": d,
                "cond_dim": c,
                "n_blocks": nb,
                "n_heads": h,
                "dropout": 0.1,
                "time_conditioning": False,
                "var_min": True,
                "return_dict": False,
            }
        )
    )
    (folder / "modeling_bd3lm.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "configuration_bd3lm.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


def test_bd3lm_folder_is_accepted_and_its_clip_range_read(data_dir, tmp_path):
    src = bd3lm_folder(tmp_path / "bd3lm")
    out = tmp_path / "run"
    r = did(
        "finetune-mixscale",
        "--init",
        str(src),
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "2",
        "--warmup",
        "1",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "remote-code-ran").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["init_clip"] == pytest.approx([0.45, 0.95])
    assert cfg["block_sizes"] == [4, L] and cfg["block_weights"] == pytest.approx([0.9, 0.1])
    state = json.loads(next((out / "checkpoints").glob("step-*/train_state/state.json")).read_text())
    # the learned range belongs to the folder's block size (4); the global block starts at (0, 1)
    assert state["clip_ranges"]["4"] == pytest.approx([0.45, 0.95])
    assert state["clip_ranges"][str(L)] == [0.0, 1.0]


@pytest.mark.parametrize("damage", ["rename", "reshape"])
def test_bd3lm_folder_with_a_bad_tensor_is_refused_by_name(damage, data_dir, tmp_path):
    name = "backbone.blocks.1.attn_out.weight"
    kw = {"rename": (name, "backbone.blocks.1.attn_proj.weight")} if damage == "rename" else {"reshape": name}
    src = bd3lm_folder(tmp_path / "bd3lm", **kw)
    r = did(
        "finetune-mixscale",
        "--init",
        str(src),
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--batch-size",
        "2",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and name in r.stderr


@pytest.fixture(scope="module")
def bd3lm_init(tmp_path_factory) -> Path:
    return bd3lm_folder(tmp_path_factory.mktemp("init") / "bd3lm")


def test_clip_auto_picks_and_records_ranges(bd3lm_init, data_dir, tmp_path):
    out = tmp_path / "run"
    r = did(
        "finetune-mixscale",
        "--init",
        str(bd3lm_init),
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--eval-every",
        "1",
        "--eval-batches",
        "2",
        "--clip",
        "auto",
        "--clip-batches",
        "2",
        "--clip-widths",
        "0.5,0.9",
        "--warmup",
        "1",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    state = json.loads((out / "checkpoints/step-00000001/train_state/state.json").read_text())
    assert state["clip_mode"] == "auto"
    ev = events(out, "eval")[-1]
    # the grid: (0.001, 1), 11 ranges of width 0.5 and 3 of width 0.9
    variances = ev["clip_scores_b4"]
    assert len(variances) == 1 + 11 + 3 and list(variances)[:3] == ["0.001,1", "0.001,0.5", "0.05,0.55"]
    lo, hi = state["clip_ranges"]["4"]
    assert f"{lo:g},{hi:g}" == min(variances, key=variances.get) and ev["clip_ranges"]["4"] == [lo, hi]
    # the global block is never searched unless asked: it keeps the full range
    assert f"clip_scores_b{L}" not in ev and ev["clip_searched"] == [4]
    assert state["clip_ranges"][str(L)] == [0.0, 1.0]
    ckpt_cfg = json.loads((out / "checkpoints/step-00000001/config.json").read_text())
    assert ckpt_cfg["clip_ranges"] == state["clip_ranges"]
    # asked: the global block is searched too
    out2 = tmp_path / "run2"
    r = did(
        "finetune-mixscale",
        "--init",
        str(bd3lm_init),
        "--data",
        str(data_dir),
        "--out",
        str(out2),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--clip",
        "auto",
        "--clip-batches",
        "1",
        "--clip-widths",
        "0.9",
        "--clip-global",
        "--warmup",
        "1",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    ev = events(out2, "eval")[-1]
    assert ev["clip_searched"] == [4, L] and len(ev[f"clip_scores_b{L}"]) == 1 + 3


def test_clip_out_of_range_is_a_usage_error(bd3lm_init, data_dir, tmp_path):
    r = did(
        "finetune-mixscale",
        "--init",
        str(bd3lm_init),
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "run"),
        "--clip",
        "0.5,1.5",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--clip" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_steps_default_to_the_budget_fraction(bd3lm_init, data_dir, tmp_path):
    # the budget is in tokens: 0.26 x 10 baseline steps x 512 x 1024 tokens; at 2 rows of L
    # tokens per step that is ceil(0.26 * 10 * 512 * 1024 / (2 * L)) steps. A baseline batch of
    # 2 x L tokens makes it 0.26 x 10 = 2.6 -> 3 steps.
    out = tmp_path / "run"
    r = did(
        "finetune-mixscale",
        "--init",
        str(bd3lm_init),
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--baseline-steps",
        "10",
        "--baseline-batch-tokens",
        str(2 * L),
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "2",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    train_cfg = json.loads((out / "config.json").read_text())["train"]
    assert train_cfg["steps"] == 3 and train_cfg["tokens"] == round(0.26 * 10 * 2 * L)
    from did_cli.training.train_config import MixScaleConfig

    # the paper's figure: 26% of 150K steps of 512 x 1024 tokens
    assert MixScaleConfig().budget_tokens() == round(0.26 * 150_000 * 512 * 1024) == 20_447_232_000
