"""Fast paths agree with the reference paths.

The first tests run on a CPU (the fast drafting loop with graphs off, the flat-index gather, the
GPU benchmark script's dry run). Those marked `gpu` need CUDA and check the device paths:
flex vs dense attention, cached vs uncached drafting, CUDA-graph step vs eager step, compiled
vs eager training.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from did_cli import attention
from did_cli.config import DiffusionConfig
from did_cli.diffusion import nelbo
from did_cli.sampling.fast import FastFirstHitting
from did_cli.sampling import DraftConfig, draft
from did_cli.sampling.core import make_generator, mix_seed

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")(fn))


# ------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_draft_equals_eager_cached_step(batch):
    """Static-shape step (graph path, run eagerly) == DiT.step, given the same draws."""
    model = tiny_model(32)
    outs = [FastFirstHitting(model, batch, 32, 4, use_graph=False, reference=ref).run(torch.Generator().manual_seed(5))
            for ref in (False, True)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.allclose(outs[0].conf, outs[1].conf, equal_nan=True, rtol=0, atol=1e-9)
    assert outs[0].calls == outs[1].calls == (32 - 1) + (32 // 4 - 1)
    assert not (outs[0].tokens == model.config.mask_id).any()


def test_fast_draft_batch1_equals_library_draft():
    """At batch 1, with the generator of (seed, 0), the draws are those of sampling.draft."""
    model = tiny_model(32)
    rec = next(iter(draft(model, DraftConfig(n=1, length=32, block_size=4, batch_size=1, seed=3), progress=False)))
    out = FastFirstHitting(model, 1, 32, 4, use_graph=False).run(make_generator(mix_seed(3, 0), "cpu"))
    assert out.tokens[0].tolist() == rec["tokens"]
    assert out.calls == rec["nfe"]
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
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_gpu.py"), "--dry-run", "--out", str(out), "--compile", "off"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
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
    assert fig["summary"] and "summary" in proc.stdout


# ------------------------------------------------------------------------------------------ GPU


def _loss_and_grads(model, x0, block):
    g = torch.Generator(device=x0.device).manual_seed(0)
    out = nelbo(model, x0, block, DiffusionConfig(), model.config.mask_id, g)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


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
        cfg = DraftConfig(n=4, length=64, block_size=4, batch_size=4, seed=2, use_cache=cache)
        recs[cache] = [r["tokens"] for r in draft(model, cfg, progress=False)]
    assert recs[True] == recs[False]


@gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_step_equals_eager_step_cuda(batch):
    model = tiny_model(64).cuda()
    graph = FastFirstHitting(model, batch, 64, 4, use_graph=True)
    assert graph.graphed
    a = graph.run(torch.Generator(device="cuda").manual_seed(3))
    b = FastFirstHitting(model, batch, 64, 4, reference=True).run(torch.Generator(device="cuda").manual_seed(3))
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
