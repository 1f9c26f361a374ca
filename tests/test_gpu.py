"""Fast paths agree with the reference paths.

The first tests run on a CPU (the fast drafting loop with graphs off, the flat-index gather, the
GPU benchmark script's dry run; tests/test_fast_paths.py has the rest of what a CPU can prove).
Those marked `gpu` need CUDA and check the device paths: flex vs dense attention at lengths
with full and partial tiles in bf16, cached vs uncached drafting, CUDA-graph step vs eager
step, no host synchronisation in a fast draft and none per block in the library's draft, the
capture fallback (which leaves the allocator usable), a second device, compiled vs eager
training, no recompiles after warm-up, and a `did train` run. Each GPU test starts with fresh
dynamo caches and ends with the allocator checked, so their order does not matter.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from did_cli.core import attention
from did_cli.core.diffusion import nelbo
from did_cli.core.dit import DiT
from did_cli.core.model_config import DiffusionConfig
from did_cli.sampling import DraftConfig, draft, graph
from did_cli.sampling.core import make_generator, mix_seed
from did_cli.sampling.fast import FastFirstHitting, resolve_dtype

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def gpu(fn):
    return pytest.mark.gpu(
        pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")(
            fn
        )
    )


@pytest.fixture(autouse=True)
def _independent_gpu_test(request):
    """A GPU test starts with no compiled code of an earlier one (dynamo's caches and their
    recompile limits are per process) and must leave no capture behind: `empty_cache` fails an
    internal assert while the allocator still routes to a capture's pool."""
    if not (HAS_CUDA and request.node.get_closest_marker("gpu")):
        yield
        return
    import torch._dynamo

    torch._dynamo.reset()
    graph.forget_compiled()
    yield
    torch.cuda.synchronize()
    assert not torch.cuda.is_current_stream_capturing()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_draft_equals_eager_cached_step(batch):
    """Static-shape step (graph path, run eagerly) == DiT.step, given the same draws."""
    model = tiny_model(32)
    outs = [
        FastFirstHitting(model, batch, 32, 4, use_graph=False, reference=ref).run(
            torch.Generator().manual_seed(5)
        )
        for ref in (False, True)
    ]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.allclose(outs[0].conf, outs[1].conf, equal_nan=True, rtol=0, atol=1e-9)
    assert outs[0].calls == outs[1].calls == (32 - 1) + (32 // 4 - 1)
    assert not (outs[0].tokens == model.config.mask_id).any()


def test_fast_draft_batch1_equals_library_draft():
    """At batch 1, with the generator of (seed, 0), the draws are those of sampling.draft."""
    model = tiny_model(32)
    rec = next(
        iter(draft(model, DraftConfig(n=1, length=32, block_size=4, batch_size=1, seed=3), progress=False))
    )
    out = FastFirstHitting(model, 1, 32, 4, use_graph=False).run(make_generator(mix_seed(3, 0), "cpu"))
    assert out.tokens[0].tolist() == rec["tokens"]
    assert out.calls == rec["forward_passes"]
    got = out.conf[0, 1:].tolist()
    assert max(abs(a - b) for a, b in zip(got, rec["confidence"][1:])) < 1e-9


def test_fast_draft_reusable():
    """A second run on the same object (cache reset, graph kept) repeats the first."""
    model = tiny_model(16)
    fh = FastFirstHitting(model, 2, 16, 4, use_graph=False)
    a = fh.run(torch.Generator().manual_seed(1)).tokens.clone()
    fh.run(torch.Generator().manual_seed(2))
    assert torch.equal(fh.run(torch.Generator().manual_seed(1)).tokens, a)


def test_flat_index_select_equals_boolean_select():
    model = tiny_model(16)
    x0 = torch.randint(0, model.config.mask_id, (2, 16))
    sel = torch.rand(2, 16) < 0.5
    xt = torch.where(sel, model.config.mask_id, x0)
    a = model(xt, 4, x0=x0, select=sel)
    b = model(xt, 4, x0=x0, select=sel.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(a, b)


@pytest.mark.slow
def test_run_gpu_dry_run(tmp_path):
    """The one-command GPU benchmark runs end to end on the tiny preset (so it cannot rot)."""
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run_gpu.py"),
            "--dry-run",
            "--out",
            str(out),
            "--compile",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    for key in ("torch", "device", "date"):
        assert fig["env"][key]
    for name in ("draft", "refine", "train"):
        assert "error" not in fig[name], fig[name].get("error")
    assert {r["variant"] for r in fig["draft"]["rows"]} >= {"eager-step", "eager-static"}
    assert all(r["kv_cache_bytes"] > 0 and r["tokens_per_s"] > 0 for r in fig["draft"]["rows"])
    assert fig["refine"]["runs"] and "skipped" in fig["refine"]["gen_ppl"]
    assert any(r["blocks"] == [4, 32] and r["mask_builds"] == 0 for r in fig["train"]["rows"])
    assert any(
        r["blocks"] == [4, 16] and r["new_graphs"] == 0 for r in fig["train"]["rows"]
    )  # the 4 <-> 16 row
    trainer = fig["train"]["trainer"]  # did train's own step
    assert trainer["steps"] >= 1 and trainer["tokens_per_s"] > 0 and trainer["compiled"] is False
    assert list(fig)[list(fig).index("train") :][:3] == ["train", "draft", "refine"]  # training first
    # the script runs on CUDA when the host has it (its default --device): the library drafts on the graph
    on_cuda = fig["env"]["device"] != "cpu"
    assert (
        fig["draft"]["library"]["path"] == ("graph" if on_cuda else "eager-cached") and fig["deadline_s"] > 0
    )
    assert fig["summary"] and "summary" in proc.stdout


@pytest.mark.slow
def test_run_gpu_deadline_keeps_what_was_measured(tmp_path):
    """Past --deadline the script stops where it is and still writes the JSON and the summary.

    The deadline is a small fraction of an uncut dry run (about 9 s on 2 cores, the training
    section alone about 4 s), so the cut does not depend on the machine's speed."""
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run_gpu.py"),
            "--dry-run",
            "--out",
            str(out),
            "--compile",
            "off",
            "--deadline",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["wall_s"] < 30 and "summary" in fig
    cut = [
        k
        for k in ("train", "draft", "refine")
        if k not in fig or "stopped" in fig[k] or fig[k].get("info", {}).get("skipped")
    ]
    assert cut, {k: list(fig.get(k, {})) for k in ("train", "draft", "refine")}


# ------------------------------------------------------------------------------------------ GPU


def _loss_and_grads(model, x0, block):
    g = torch.Generator(device=x0.device).manual_seed(0)
    out = nelbo(model, x0, block, DiffusionConfig(), model.config.mask_id, g)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    return out.loss.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def _close_grads(a, b, tol):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=tol, rtol=tol), (n, (a[n] - b[n]).abs().max().item())


@gpu
@pytest.mark.parametrize("block", [4, 16])
def test_flex_equals_dense_forward_and_grads_cuda(block):
    model = tiny_model(64).cuda().train()
    x0 = torch.randint(0, model.config.mask_id, (4, 64), device="cuda")
    x0[:, 0] = model.config.bos_id
    res = {}
    for backend in ("flex", "sdpa"):
        attention.set_backend(backend)
        try:
            res[backend] = _loss_and_grads(model, x0, block)
        finally:
            attention.set_backend("auto")
    assert torch.allclose(res["flex"][0], res["sdpa"][0], atol=1e-5, rtol=1e-5)
    _close_grads(res["flex"][1], res["sdpa"][1], 1e-4)


@gpu
def test_cached_equals_uncached_drafting_cuda():
    model = tiny_model(64).cuda()
    recs = {}
    for cache in (True, False):
        cfg = DraftConfig(n=4, length=64, block_size=4, batch_size=4, seed=2, use_cache=cache, dtype="fp32")
        recs[cache] = [r["tokens"] for r in draft(model, cfg, progress=False)]
    assert recs[True] == recs[False]


@gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_step_equals_eager_step_cuda(batch):
    model = tiny_model(64).cuda()
    graph = FastFirstHitting(model, batch, 64, 4, use_graph=True)
    assert graph.graphed
    a = graph.run(torch.Generator(device="cuda").manual_seed(3))
    b = FastFirstHitting(model, batch, 64, 4, reference=True).run(
        torch.Generator(device="cuda").manual_seed(3)
    )
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.conf, b.conf, equal_nan=True, atol=1e-6)


@gpu
def test_cuda_graph_step_logits_bf16_cuda():
    """Under bf16 autocast the replayed graph gives the logits of the same step run eagerly."""
    from did_cli.sampling.graph import GraphedStep

    model = tiny_model(64).cuda()
    x = torch.randint(0, model.config.mask_id, (2, 4), device="cuda")
    outs = []
    for use_graph in (True, False):
        cache = model.new_cache(2, 64, dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            step = GraphedStep(model, cache, 2, 4, use_graph=use_graph)
            step.commit(x)
            outs.append(step(x.flip(1)).float().clone())
    assert torch.allclose(outs[0], outs[1], atol=1e-2, rtol=1e-2)


@gpu
def test_compiled_equals_eager_training_cuda():
    model = tiny_model(64).cuda().train()
    compiled = copy.deepcopy(model).compile_blocks()
    x0 = torch.randint(0, model.config.mask_id, (4, 64), device="cuda")
    x0[:, 0] = model.config.bos_id
    for block in (4, 64, 4):  # switching back reuses the first graph
        la, ga = _loss_and_grads(model, x0, block)
        lb, gb = _loss_and_grads(compiled, x0, block)
        assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)
        _close_grads(ga, gb, 1e-3)


@gpu
@pytest.mark.parametrize("n,block", [(256, 4), (256, 16), (256, 128), (320, 8), (200, 8)])
def test_flex_equals_dense_bf16_long_cuda(n, block):
    """Block-sparse flex vs the dense mask in bf16 at 2n >= 400 tokens: 128-token tiles that are
    fully visible, partly visible and (n = 200, 320) cut short at the end."""
    torch.manual_seed(0)
    for kind in ("train", "causal"):
        spec = attention.mask_spec(kind, block, n)
        q, k, v = (torch.randn(2, 4, spec.seq_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = attention.attend(
            q.float(), k.float(), v.float(), spec, attention.dense_mask(kind, block, n, q.device)
        )
        dense = attention.attend(q, k, v, spec, attention.dense_mask(kind, block, n, q.device))
        flex = attention.attend(q, k, v, spec, attention.flex_mask(kind, block, n, q.device))
        assert flex.dtype == torch.bfloat16
        torch.testing.assert_close(flex.float(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(dense.float(), ref, atol=2e-2, rtol=2e-2)


@gpu
def test_compiled_training_no_recompile_after_warmup_cuda():
    """Compiled blocks under bf16 autocast with flex: after each (shape, grad mode) ran once,
    switching 4 <-> 16 <-> L and evaluating recompiles nothing (dynamo would raise)."""
    import torch._dynamo

    model = tiny_model(256).cuda().train()
    model.compile_blocks()
    x0 = torch.randint(0, model.config.mask_id, (4, 256), device="cuda")
    x0[:, 0] = model.config.bos_id

    def rounds(blocks):
        for block in blocks:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _loss_and_grads(model, x0, block)
                with torch.no_grad():
                    nelbo(model, x0, block, DiffusionConfig(), model.config.mask_id)

    rounds([4, 256])  # warm-up: the 2L pass and the 1L pass, with and without grad
    with torch._dynamo.config.patch(error_on_recompile=True):
        rounds([16, 4, 256, 16, 64, 4])


@gpu
def test_fast_draft_has_no_host_sync_cuda():
    """The fast draft loop and the library's fill loop on the CUDA-graph step never synchronise
    with the host (torch raises on any synchronising call in this mode)."""
    from did_cli.sampling.core import SamplerSettings, fill
    from did_cli.sampling.fast import cached_step

    model = tiny_model(64).cuda()
    fh = FastFirstHitting(model, 4, 64, 4, dtype="bf16")
    assert fh.graphed and fh.step.compiled
    g = torch.Generator(device="cuda").manual_seed(0)
    fh.run(g)
    torch.cuda.synchronize()
    sp = SamplerSettings("first-hitting", None, None, 0.9, model.config.mask_id)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        step = cached_step(model, 4, 64, 4, "bf16", "auto")
    assert step.path == "graph"
    x = torch.full((4, 64), model.config.mask_id, device="cuda")
    x[:, 0] = model.config.bos_id
    conf = torch.zeros((4, 64), dtype=torch.float64, device="cuda")
    gens = [make_generator(i, "cuda") for i in range(4)]

    def logits_fn(sel, flat, s=0):
        lg = step(x[:, s : s + 4])
        return lg.reshape(-1, lg.shape[-1]).index_select(0, flat)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fh.run(g)
        for s in range(0, 64, 4):
            fill(
                x,
                conf,
                s,
                s + 4,
                [4 - (s == 0)] * 4,
                lambda sel, flat, s=s: logits_fn(sel, flat, s),
                gens,
                sp,
            )
            step.commit(x[:, s : s + 4])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not (x == model.config.mask_id).any()


class _SyncingDiT(DiT):
    """Fault injection: a step that reads a value back to the host, which no CUDA graph can
    capture."""

    def step_static(self, x, cache, consts=None, need_logits=True):
        if float(cache.start.sum()) < 0:
            raise AssertionError("unreachable")
        return super().step_static(x, cache, consts, need_logits)


@gpu
def test_capture_failure_falls_back_in_one_line_cuda(capfd):
    from did_cli.sampling.graph import GraphedStep

    model = tiny_model(64)
    broken = _SyncingDiT(model.config)
    broken.load_state_dict(model.state_dict())
    broken = broken.cuda().eval()
    capfd.readouterr()
    step = GraphedStep(broken, broken.new_cache(2, 64), 2, 4, use_graph=True, compile=False)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA-graph capture of the drafting step failed" in err[0], err
    assert step.graph is None and not torch.cuda.is_current_stream_capturing()
    x = torch.randint(0, model.config.mask_id, (2, 4), device="cuda")
    ref = GraphedStep(broken, broken.new_cache(2, 64), 2, 4, use_graph=False, compile=False)
    assert torch.equal(step(x), ref(x))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the failed capture's pool was ended: the allocator is usable
    assert torch.equal(step(x), ref(x))


@gpu
def test_library_draft_runs_the_graph_cuda(tok):
    model = tiny_model(64).cuda()
    recs = {}
    for path in ("auto", "off"):
        cfg = DraftConfig(
            n=3, length=64, block_size=4, batch_size=2, seed=2, fast_path=path, prompts=["The"], dtype="fp32"
        )
        recs[path] = list(draft(model, cfg, tokenizer=tok, progress=False))
    assert {r["draft"]["path"] for r in recs["auto"]} == {"graph"} and recs["auto"][0]["draft"]["compiled"]
    assert {r["draft"]["path"] for r in recs["off"]} == {"eager-cached"}
    assert [r["tokens"] for r in recs["auto"]] == [r["tokens"] for r in recs["off"]]


@gpu
def test_library_draft_entropy_check_adds_no_sync_per_block_cuda(tok):
    """A whole `draft()` at 512 tokens (64 blocks checked by the entropy rule) synchronises with
    the host as often as one with the check off, but for the one read of its verdicts."""
    model = tiny_model(512).cuda()

    def syncs(min_entropy):
        cfg = DraftConfig(n=2, length=512, block_size=4, batch_size=2, seed=0, min_entropy=min_entropy)
        list(draft(model, cfg, tokenizer=tok, progress=False))  # compiles this shape
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                recs = list(draft(model, cfg, tokenizer=tok, progress=False))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught), recs

    off, _ = syncs(None)
    on, recs = syncs(0.5)
    assert recs[0]["draft"]["path"] == "graph"
    assert recs[0]["draft"]["dtype"] == resolve_dtype("auto", torch.device("cuda"))  # bf16 on an H100
    assert on - off <= 2, (on, off)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graph_draft_on_a_second_device_cuda(tok):
    """`--device cuda:1`: the step is captured on that device (not the current one) and drafts
    what it drafts on cuda:0."""
    toks = {}
    for dev in ("cuda:0", "cuda:1"):
        cfg = DraftConfig(n=2, length=64, block_size=4, batch_size=2, seed=2, device=dev, dtype="fp32")
        recs = list(draft(tiny_model(64), cfg, tokenizer=tok, progress=False))
        assert recs[0]["draft"]["path"] == "graph"
        toks[dev] = [r["tokens"] for r in recs]
    assert toks["cuda:0"] == toks["cuda:1"]


@gpu
def test_did_train_smoke_cuda(tmp_path):
    """`did train` on CUDA compiles by default and runs mixed block sizes with validation and
    --clip auto."""
    from test_train import corpus_slice

    def did(*args):
        return subprocess.run(
            [sys.executable, "-m", "did_cli.cli", *args],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
        )

    p = did(
        "prepare",
        str(corpus_slice(tmp_path / "slice.jsonl")),
        "--out",
        str(tmp_path / "data"),
        "--seq-len",
        "64",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    p = did(
        "train",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--block-sizes",
        "4,16,L",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--clip",
        "auto",
        "--quiet",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["compiled"] is True
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"][-1] == 12
    assert "recompile" not in p.stderr.lower(), p.stderr[-2000:]
