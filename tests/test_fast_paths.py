"""The fast paths, proved on a CPU: the static step compiled by inductor equals the eager one,
`did draft` / `did refine` on the fast path equal the reference path token for token, the graph
owns what it reads and falls back in one line, the sampler's memory is bounded and its chunks
do not change samples, and one compiled graph serves every block size (the sampler's own
arithmetic: tests/test_nucleus.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from did_cli.core import attention
from did_cli.core.dit import DiT
from did_cli.core.model_config import preset
from did_cli.sampling import DraftConfig, RefineConfig, core, draft, refine
from did_cli.sampling.fast import low_precision_copy
from did_cli.sampling.graph import GraphedStep

REPO = Path(__file__).resolve().parents[1]


def _run_static_steps(model, step, x):
    """Logits of every block (then its commit) through `step`, and the cache afterwards."""
    outs = []
    with torch.no_grad():
        for s in range(0, x.shape[1], 4):
            outs.append(step(x[:, s : s + 4]).clone())
            step.commit(x[:, s : s + 4])
    return torch.stack(outs), [t.clone() for t in step.cache.k + step.cache.v]


@pytest.mark.slow
def test_compiled_static_step_equals_eager():
    """Inductor's static step (what the CUDA graph captures) == the eager one, and it writes the
    KV cache in place (the graph replays raw addresses)."""
    model = tiny_model(32)
    x = torch.randint(0, model.config.mask_id, (2, 32))
    eager = GraphedStep(model, model.new_cache(2, 32), 2, 4, use_graph=False, compile=False)
    compiled = GraphedStep(model, model.new_cache(2, 32), 2, 4, use_graph=False, compile=True)
    assert compiled.compiled and not eager.compiled
    ptrs = [t.data_ptr() for t in compiled.cache.k + compiled.cache.v]
    a, ca = _run_static_steps(model, eager, x)
    b, cb = _run_static_steps(model, compiled, x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for u, v in zip(ca, cb):
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)
    assert [t.data_ptr() for t in compiled.cache.k + compiled.cache.v] == ptrs


# top-p 1 skips the float64 sort over the 50258-token vocabulary (the costliest part on a CPU)
@pytest.mark.parametrize(
    "sampler,k,dtype,top_p",
    [
        ("first-hitting", None, "fp32", 1.0),
        ("parallel", 2, "fp32", 1.0),
        pytest.param("first-hitting", None, "bf16", 0.9, marks=pytest.mark.slow),
    ],
)
def test_fast_draft_equals_eager_draft_token_for_token(tok, sampler, k, dtype, top_p):
    """`draft` on the static-shape step (the graph path's arithmetic, a padded last batch, the
    bf16 Linear copy) gives the reference path's tokens, with prompts and a suffix."""
    model = tiny_model(32)
    base = dict(
        n=2,
        length=32,
        block_size=4,
        batch_size=3,
        seed=4,
        sampler=sampler,
        tokens_per_step=k,
        dtype=dtype,
        top_p=top_p,
        prompts=["The cat", "A"],
        suffix=" end.",
    )
    recs = {
        p: list(draft(model, DraftConfig(**base, fast_path=p), tokenizer=tok, progress=False))
        for p in ("off", "static")
    }
    assert [r["draft"]["path"] for r in recs["off"]] == ["eager-cached"] * 4
    assert [r["draft"]["path"] for r in recs["static"]] == ["static"] * 4
    for a, b in zip(recs["off"], recs["static"]):
        assert a["tokens"] == b["tokens"]
        assert a["nfe"] == b["nfe"]
        assert (
            max(abs(x - y) for x, y in zip(a["confidence"][1:], b["confidence"][1:]) if x is not None) < 1e-6
        )


def test_fast_refine_equals_eager_refine(tok):
    model = tiny_model(32)
    drafts = list(
        draft(
            model, DraftConfig(n=3, length=32, batch_size=3, seed=1, top_p=1.0), tokenizer=tok, progress=False
        )
    )
    out = {}
    for p in ("off", "static"):
        cfg = RefineConfig(
            stages=[(8, 0.3), (None, 0.25)],
            sampler="parallel",
            tokens_per_step=2,
            batch_size=2,
            top_p=0.9,
            fast_path=p,
        )
        out[p] = list(refine(model, drafts, cfg, tokenizer=tok, progress=False))
    assert [r["tokens"] for r in out["off"]] == [r["tokens"] for r in out["static"]]
    assert [s["path"] for s in out["static"][0]["stages"]] == ["static", "eager"]
    assert [s["path"] for s in out["off"][0]["stages"]] == ["eager-cached", "eager"]


def test_low_precision_copy_computes_what_autocast_does():
    """bf16 Linear weights under bf16 autocast == float32 weights under it, bit for bit; the
    embedding and norms are shared, not copied."""
    model = tiny_model(32)
    low = low_precision_copy(model, torch.bfloat16)
    x = torch.randint(0, model.config.mask_id, (2, 32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x, 4), low(x, 4))
    assert low.vocab_embed.embedding is model.vocab_embed.embedding
    assert low.blocks[0].norm1.weight is model.blocks[0].norm1.weight
    assert low.output_layer.linear.weight.dtype == torch.bfloat16


def test_step_owns_its_constants_and_rotary_values_do_not_depend_on_the_table():
    model = tiny_model(32)
    step = GraphedStep(model, model.new_cache(1, 32), 1, 4, use_graph=False)
    shared = model.rotary_emb.cos_sin(0, 32, torch.device("cpu"))[0]
    assert step.consts.cos.untyped_storage().data_ptr() != shared.untyped_storage().data_ptr()
    x = torch.randint(0, model.config.mask_id, (1, 4))
    with torch.no_grad():
        before = step(x).clone()
        small = model.rotary_emb.cos_sin(5, 3, torch.device("cpu"))[0].clone()
        model.rotary_emb.cos_sin(0, 5000, torch.device("cpu"))  # the shared table is replaced
        assert torch.equal(model.rotary_emb.cos_sin(5, 3, torch.device("cpu"))[0], small)
        assert torch.equal(step(x), before)


def test_graph_capture_failure_falls_back_in_one_line(capfd):
    """Asking for a graph where none can be captured (here: no CUDA) warns once and runs the
    same step eagerly."""
    model = tiny_model(32)
    x = torch.randint(0, model.config.mask_id, (2, 32))
    want, _ = _run_static_steps(model, GraphedStep(model, model.new_cache(2, 32), 2, 4, use_graph=False), x)
    capfd.readouterr()
    step = GraphedStep(model, model.new_cache(2, 32), 2, 4, use_graph=True, compile=False)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "did: warning: CUDA-graph capture of the drafting step failed"
    ), err
    assert step.graph is None and step.path == "static"
    got, _ = _run_static_steps(model, step, x)
    assert torch.equal(got, want)


def test_sampler_chunks_do_not_change_samples(monkeypatch):
    """Drawing in chunks (bounded memory) gives what one chunk gives: the same draws from logits;
    from hidden states through the output layer chunk by chunk, the same tokens (a matrix
    product's rounding may depend on its row count)."""
    model = tiny_model(32)
    h = torch.randn(12, model.config.hidden_dim)
    sp = core.SamplerSettings("parallel", 2, None, 0.9, model.config.mask_id)
    groups = [(0, 5), (1, 4), (2, 3)]
    res = []
    for budget, rows in ((1 << 40, 16), (1, 1), (1 << 40, 5)):  # one chunk; one row per chunk; 5 rows
        monkeypatch.setitem(core.CHUNK_BYTES, "cpu", budget)
        monkeypatch.setattr(core, "CPU_SAMPLE_ROWS", rows)
        for out in (model.logits(h), core.RowLogits(h, model.logits, model.config.vocab_size)):
            gens = [core.make_generator(i, "cpu") for i in range(3)]
            with torch.no_grad():
                res.append(core.draw(out, groups, gens, sp))
    for i in (2, 4):  # logits: whatever the chunks
        assert torch.equal(res[0][0], res[i][0]) and torch.equal(res[0][1], res[i][1])
    for tok, p in res[1::2]:
        assert torch.equal(tok, res[0][0])
        torch.testing.assert_close(p, res[0][1], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_uncached_draft_builds_few_masks(tok):
    """The uncached pass runs at a prefix length rounded up to a quarter of L: 4 masks (and
    compiled shapes) for 16 blocks, the same tokens as the cached path."""
    model = tiny_model(64)
    attention.dense_mask.cache_clear()
    cfg = DraftConfig(n=1, length=64, block_size=4, batch_size=1, seed=2, use_cache=False, top_p=1.0)
    a = next(iter(draft(model, cfg, tokenizer=tok, progress=False)))
    assert attention.dense_mask.cache_info().misses == 4
    b = next(
        iter(draft(model, DraftConfig(**{**cfg.__dict__, "use_cache": True}), tokenizer=tok, progress=False))
    )
    assert a["tokens"] == b["tokens"] and a["draft"]["path"] == "uncached"


@pytest.mark.skipif(not attention.HAS_FLEX, reason="this torch has no FlexAttention")
def test_one_compiled_flex_graph_for_every_block_size():
    """The block size is a tensor the mask function reads: switching block sizes reuses the
    compiled graph (an int would recompile once per block size)."""
    from torch._dynamo.utils import counters

    n = 64
    q, k, v = (torch.randn(2, 2, 2 * n, 16) for _ in range(3))
    fn = torch.compile(attention.attend_kind, dynamic=False)
    before = counters["frames"]["ok"]
    with torch.no_grad():
        for bs in (4, 16, 4, 8):
            m = attention.flex_mask("train", bs, n, torch.device("cpu"))
            dense = attention.attend_kind(
                q, k, v, "train", attention.dense_mask("train", bs, n, torch.device("cpu"))
            )
            torch.testing.assert_close(fn(q, k, v, "train", m), dense, atol=1e-5, rtol=1e-5)
    assert counters["frames"]["ok"] - before == 1


@pytest.mark.slow
def test_mixed_block_training_compiles_one_graph_per_shape(tmp_path):
    """A compiled run over block sizes 4, 16 and L with validation and --clip auto: two graphs
    (the 2L pass of every block size < L, the 1L pass of L), however often the size switches."""
    from test_train import corpus_slice
    from torch._dynamo.utils import counters

    from did_cli.io.data import prepare
    from did_cli.training import TrainConfig, train

    prepare([str(corpus_slice(tmp_path / "slice.jsonl"))], tmp_path / "data", seq_len=32, progress=False)
    cfg = TrainConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "run"),
        block_sizes=[4, 16, "L"],
        block_weights=None,
        steps=12,
        batch_size=2,
        lr=3e-3,
        warmup=2,
        ema=0.9,
        eval_every=4,
        eval_batches=2,
        save_every=0,
        log_every=1,
        progress=False,
        clip="auto",
        compile=True,
    )
    before = counters["frames"]["ok"]
    train(cfg)
    blocks = [
        e["block_size"]
        for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if e["event"] == "train"
    ]
    assert set(blocks) == {4, 16, 32} and sum(a != b for a, b in zip(blocks, blocks[1:])) >= 4
    assert counters["frames"]["ok"] - before == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["compiled"] is True


def _peak_rss_of(cmd: list[str]) -> tuple[int, int]:
    """(exit status, peak resident bytes) of a child process."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024


@pytest.mark.slow
def test_parallel_refine_peak_memory(tmp_path, tok):
    """`did refine --sampler parallel` at batch 32, L = 64, ratio 0.5 (1000 masked rows per call,
    a [1000, V] float64 tensor is 400 MB): the process peaks well below 1.5 GB."""
    from did_cli.io.checkpoint import save_model
    from did_cli.io.records import dumps, make_record

    torch.manual_seed(0)
    model = DiT(preset("tiny", model_length=64, dropout=0.0))
    save_model(model, tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    lines = [
        dumps(
            make_record(
                [model.config.bos_id] + torch.randint(0, 50000, (63,), generator=g).tolist(),
                [None] + torch.rand(63, generator=g).tolist(),
                id=f"d{i}",
                tokenizer=tok,
            )
        )
        for i in range(32)
    ]
    (tmp_path / "drafts.jsonl").write_text("\n".join(lines) + "\n")
    rc, peak = _peak_rss_of(
        [
            sys.executable,
            "-m",
            "did_cli.cli",
            "refine",
            str(tmp_path / "drafts.jsonl"),
            "--model",
            str(tmp_path / "model"),
            "--stages",
            "L:0.5",
            "--sampler",
            "parallel",
            "--tokens-per-step",
            "4",
            "--batch-size",
            "32",
            "-o",
            str(tmp_path / "out.jsonl"),
        ]
    )
    assert rc == 0
    print(f"peak RSS {peak / 2**30:.2f} GiB")
    assert peak < 1.5e9, peak
    assert math.isfinite(
        json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["stages"][0]["seconds"]
    )
