"""The fast paths, proved on a CPU: the static step compiled by inductor equals the eager one,
`did draft` / `did refine` on the fast path equal the reference path token for token, the graph
owns what it reads and falls back in one line, the sampler's memory is bounded and its chunks
do not change samples, and one compiled graph serves every block size (the sampler's own
arithmetic: tests/test_nucleus.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from llama_helpers import tiny_llama

from did_cli.core import attention
from did_cli.core.dit import DiT
from did_cli.core.model_config import preset
from did_cli.sampling import DraftConfig, RefineConfig, core, draft, fast, graph, refine, stopping
from did_cli.sampling.fast import low_precision_copy
from did_cli.sampling.graph import GraphedStep
from did_cli.sampling.passes import RefinePasses

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

    from did_cli.io.packing import prepare
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
    from did_cli.io.model_folder import save_model
    from did_cli.io.record_writer import dumps
    from did_cli.io.records import make_record

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


# ------------------------------------------------------------ compiled drafting says what it runs


class _ReplayGraph:
    """Stands in for a captured torch.cuda.CUDAGraph on a CPU: `replay` runs the captured
    function again into the same output (a graph that computes), or does nothing (an empty
    capture: what a stream made on another device than the model's gives)."""

    def __init__(self, fn, out, computes: bool):
        self.fn, self.out, self.computes = fn, out, computes

    def replay(self):
        if self.computes:
            new = self.fn()
            if self.out is not None:
                self.out.copy_(new)


def _fake_capture(computes: bool):
    def capture(fn, device):
        out = fn()
        return _ReplayGraph(fn, out, computes), out

    return capture


@pytest.mark.parametrize("computes", [True, False])
def test_capture_self_check(monkeypatch, capfd, computes):
    """After a capture both graphs are replayed with poisoned outputs and compared with the
    eager step: a graph that computes is kept; one that computes nothing (an empty capture) is
    dropped with one warning line, and the step runs without it, giving the same logits."""
    model = tiny_model(32)
    x = torch.randint(0, model.config.mask_id, (2, 32))
    want, want_cache = _run_static_steps(
        model, GraphedStep(model, model.new_cache(2, 32), 2, 4, use_graph=False, compile=False), x
    )
    monkeypatch.setattr(graph, "capture", _fake_capture(computes))
    capfd.readouterr()
    step = GraphedStep(model, model.new_cache(2, 32), 2, 4, use_graph=True, compile=False)
    err = capfd.readouterr().err.strip().splitlines()
    if computes:
        assert err == [] and step.path == "graph" and isinstance(step.commit_graph, _ReplayGraph)
    else:
        assert len(err) == 1 and "the CUDA graph of the drafting step does not compute" in err[0], err
        assert step.path == "static" and step.graph is None and step.commit_graph is None
    got, got_cache = _run_static_steps(model, step, x)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_cache, want_cache))


class _FailedCapture:
    """A CUDAGraph whose `capture_end` raises; `ended`: whether the capture had ended (then its
    `pool()` answers and the graph releases the pool itself)."""

    def __init__(self, ended: bool, error: BaseException):
        self.ended, self.error = ended, error

    def capture_end(self):
        raise self.error

    def pool(self):
        if not self.ended:
            raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
        return (1, 0)


class _Stop(BaseException):
    """What a benchmark's deadline raises."""


@pytest.mark.parametrize(
    "ended,end_refuses,error",
    [
        (False, False, RuntimeError("operation not permitted when stream is capturing")),
        (False, True, RuntimeError("Invalid capture.")),  # the pool had ended before the failure
        (False, False, _Stop("deadline")),
        (True, False, RuntimeError("instantiate failed")),  # the graph releases its own pool
    ],
)
def test_failed_capture_end_leaves_the_capture_pool(monkeypatch, ended, end_refuses, error):
    """A failed `capture_end` takes the allocator out of the capture's pool (else a later
    `torch.cuda.empty_cache()` fails an internal assert) and releases the pool, once; the
    error, a deadline included, goes on."""
    calls = []

    def end(index, pool):
        calls.append(("end", index, pool))
        if end_refuses:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    monkeypatch.setattr(
        torch._C, "_cuda_releasePool", lambda i, p: calls.append(("release", i, p)), raising=False
    )
    with pytest.raises(type(error)):
        graph.end_capture(_FailedCapture(ended, error), (0, 7), torch.device("cuda", 1))
    assert calls == ([] if ended else [("end", 1, (0, 7)), ("release", 1, (0, 7))])


def test_a_deadline_is_not_taken_for_a_compile_failure(monkeypatch):
    """A BaseException during compilation (the benchmark's Deadline, Ctrl-C) is not swallowed by
    the compile fallback, and the benchmark's Deadline is one."""

    def backend(gm, inputs):
        raise _Stop("deadline")

    monkeypatch.setattr(graph, "BACKEND", backend)
    model = tiny_model(16)
    with pytest.raises(_Stop):
        GraphedStep(model, model.new_cache(1, 16), 1, 4, use_graph=False, compile=True)
    monkeypatch.setattr(sys, "path", list(sys.path))  # run_gpu adds bench/ to it
    spec = importlib.util.spec_from_file_location("run_gpu", REPO / "bench" / "run_gpu.py")
    run_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_gpu)
    assert issubclass(run_gpu.Deadline, BaseException) and not issubclass(run_gpu.Deadline, Exception)


def test_step_shape_past_the_cap_warns_and_runs_uncompiled(monkeypatch, capfd):
    monkeypatch.setattr(graph, "MAX_COMPILED", graph.compiled_shapes())
    model = tiny_model(16)
    capfd.readouterr()
    step = GraphedStep(model, model.new_cache(3, 16), 3, 4, use_graph=False, compile=True)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs uncompiled" in err[0] and "MAX_COMPILED" in err[0], err
    assert not step.compiled and step.path == "static"


@pytest.mark.slow
def test_every_step_shape_compiles_past_dynamos_recompile_limit(monkeypatch, capfd):
    """Nine step shapes (dynamo's recompile limit is 8 graphs of one function) all compile, two
    graphs each (the denoising call and the commit pass), counted by dynamo; after a capture
    fallback the compiled step takes strided blocks x[:, s:e] without a recompile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(graph, "BACKEND", "eager")  # dynamo's tracing, guards and cache; no codegen
    torch._dynamo.reset()
    graph.forget_compiled()
    model = tiny_model(16)
    before = counters["stats"]["unique_graphs"]
    steps = [
        GraphedStep(model, model.new_cache(b, 16), b, 4, use_graph=False, compile=True) for b in range(1, 10)
    ]
    assert all(s.compiled for s in steps) and graph.compiled_shapes() == 9
    assert counters["stats"]["unique_graphs"] - before == 18
    capfd.readouterr()
    fell_back = GraphedStep(model, model.new_cache(2, 16), 2, 4, use_graph=True, compile=True)
    assert "capture of the drafting step failed" in capfd.readouterr().err  # no CUDA here
    x = torch.randint(0, model.config.mask_id, (2, 16))
    ref = GraphedStep(model, model.new_cache(2, 16), 2, 4, use_graph=False, compile=False)
    # config.patch, not monkeypatch: a setattr on dynamo's config module outlives its undo and
    # breaks every later compile in the process
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(0, 16, 4):
            torch.testing.assert_close(fell_back(x[:, s : s + 4]), ref(x[:, s : s + 4]), atol=1e-5, rtol=1e-5)
            fell_back.commit(x[:, s : s + 4])
            ref.commit(x[:, s : s + 4])


def test_commit_pass_skips_the_output_layer():
    model = tiny_model(16)
    step = GraphedStep(model, model.new_cache(2, 16), 2, 4, use_graph=False, compile=False)
    runs = []
    hook = model.output_layer.linear.register_forward_hook(lambda *a: runs.append(1))
    try:
        x = torch.randint(0, model.config.mask_id, (2, 4))
        step(x)
        step.commit(x)
    finally:
        hook.remove()
    assert runs == [1] and step.cache.length == 4 and int(step.cache.start) == 4


def test_refine_block_stage_reuses_one_padded_step():
    """Every batch of a block stage, the smaller last one too, runs on one step of batch_size
    rows (one compile and capture on CUDA); test_fast_refine_equals_eager_refine checks the
    padded batch's tokens."""
    model = tiny_model(32)
    passes = RefinePasses(
        model,
        RefineConfig(stages=[(8, 0.3)], batch_size=3, dtype="fp32", fast_path="static"),
        torch.device("cpu"),
    )
    full, last = passes.block_step(3, 32, 8), passes.block_step(1, 32, 8)
    assert full is last and full.batch == 3 and len(passes.steps) == 1


def test_static_cache_capacity_is_a_multiple_of_8(tok):
    model = tiny_model(32)
    with torch.inference_mode():
        step = fast.cached_step(model, 2, 30, 5, "fp32", "static")
    assert step.cache.capacity == 32
    base = dict(n=2, length=30, block_size=5, batch_size=2, seed=1, top_p=1.0, dtype="fp32")
    toks = {
        p: [
            r["tokens"] for r in draft(model, DraftConfig(**base, fast_path=p), tokenizer=tok, progress=False)
        ]
        for p in ("off", "static")
    }
    assert toks["off"] == toks["static"]


def test_dtype_auto_is_bf16_on_cuda_fp32_elsewhere_and_recorded(tok, monkeypatch):
    assert fast.resolve_dtype("auto", torch.device("cpu")) == "fp32"
    assert fast.resolve_dtype("fp16", torch.device("cpu")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert fast.resolve_dtype("auto", torch.device("cuda", 1)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert fast.resolve_dtype("auto", torch.device("cuda")) == "fp32"
    model = tiny_model(16)
    assert DraftConfig().dtype == RefineConfig().dtype == "auto"
    drafts = list(draft(model, DraftConfig(n=1, length=16, top_p=1.0), tokenizer=tok, progress=False))
    assert drafts[0]["draft"]["dtype"] == "fp32"
    out = next(iter(refine(model, drafts, RefineConfig(top_p=1.0), tokenizer=tok, progress=False)))
    assert out["stages"][0]["dtype"] == "fp32"


# ------------------------------------------------------------------ draft() without a read per block

HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")
"""Tensor methods that wait for the device's result (on CUDA: a pipeline drain)."""

TINY_IDS = SimpleNamespace(
    vocab_size=98, mask_id=97, bos_id=1, name="ids", decode=lambda ids: " ".join(map(str, ids))
)
"""A tokenizer for the small-vocabulary Llama of llama_helpers (records only decode)."""


def _host_reads(monkeypatch, fn) -> tuple[Counter, object]:
    """(reads by kind, fn()): every call of a HOST_READS method, and indexing with a boolean
    mask (a nonzero underneath), while fn runs."""
    counts: Counter = Counter()

    def counted(name, orig):
        def method(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)

        return method

    def bool_indexed(name, orig):
        def method(self, idx, *a):
            items = idx if isinstance(idx, tuple) else (idx,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                counts[name + "[bool]"] += 1
            return orig(self, idx, *a)

        return method

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        for name in ("__getitem__", "__setitem__"):
            m.setattr(torch.Tensor, name, bool_indexed(name, getattr(torch.Tensor, name)))
        out = fn()
    return counts, out


def test_draft_reads_the_host_per_batch_not_per_block(monkeypatch):
    """A whole `draft()` on the static step (the CUDA path's code, entropy check on): the same
    few host reads at 264 tokens (1 checked block) as at 392 (17 checked blocks), all of them
    at the end of the batch."""
    model = tiny_llama(length=392)
    # on a CPU the sampler prunes the vocabulary with a few reads per call of its own; a CUDA
    # device samples whole rows (pruned=False), which is the path counted here
    whole_rows = core.sample_rows
    monkeypatch.setattr(core, "sample_rows", lambda *a, **k: whole_rows(*a, **{**k, "pruned": False}))
    reads = {}
    for length in (264, 392):
        cfg = DraftConfig(
            n=2, length=length, block_size=8, batch_size=2, seed=0, min_entropy=0.5, fast_path="static"
        )
        counts, recs = _host_reads(
            monkeypatch, lambda cfg=cfg: list(draft(model, cfg, tokenizer=TINY_IDS, progress=False))
        )
        assert len(recs) == 2 and recs[0]["draft"]["path"] == "static" and "entropy_rejections" in recs[0]
        reads[length] = counts
    print("host reads per draft():", dict(reads[264]), dict(reads[392]))
    assert reads[264] == reads[392] and sum(reads[392].values()) <= 4


@pytest.mark.slow
def test_deferred_entropy_check_rejects_like_the_reference(monkeypatch):
    """Entropy rejections read back at the end of the batch (and, with STATE_BYTES 1, after
    every checked block) redraw exactly what the reference path, which stops at once, redraws:
    the failing rows' generators are rewound to their first failing block."""
    model = tiny_llama(length=288)
    base = dict(
        n=3,
        length=288,
        block_size=8,
        batch_size=3,
        seed=0,
        sampler="parallel",
        tokens_per_step=4,
        min_entropy=3.8,  # some draws of this model pass, some fail, at various blocks
        max_retries=2,
        entropy_fail="keep",
    )

    def run(path):
        return list(draft(model, DraftConfig(**base, fast_path=path), tokenizer=TINY_IDS, progress=False))

    ref = run("off")
    rejections = [r["entropy_rejections"] for r in ref]
    assert sum(rejections) > 0 and not any(r.get("low_entropy") for r in ref)
    for state_bytes in (stopping.STATE_BYTES, 1):
        monkeypatch.setattr(stopping, "STATE_BYTES", state_bytes)
        got = run("static")
        assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
        assert [r["entropy_rejections"] for r in got] == rejections
