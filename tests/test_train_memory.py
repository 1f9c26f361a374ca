"""Training memory at L = 1024 (docs/train.md, "Memory at L = 1024"): activation checkpointing and
the chunked loss give today's gradients; a flex compilation failure falls back to SDPA with the
dense mask (and lets a deadline through); rotary frequencies survive a bf16 buffer (FSDP's mixed
precision); the rows of a global batch do not depend on the process count; the optimiser state
keyed by name round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from llama_helpers import tiny_llama

from did_cli.core import attention, diffusion
from did_cli.core.diffusion import masked_token_loss, nelbo, token_nll
from did_cli.core.layers import Rotary
from did_cli.core.model_config import DiffusionConfig
from did_cli.training import sharding
from did_cli.training.state import RowSchedule


def _models():
    models = {"dit": tiny_model(32), "llama": tiny_llama(32)}
    for m in models.values():
        for blk in m.blocks:
            blk.dropout = 0.1  # the recomputed forward must draw the same masks
    return {k: m.train() for k, m in models.items()}


def _step(model, block: int, seed: int) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes autograd saved inside the transformer layers of one NELBO
    step (dropout on, seeded)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(3, c.vocab_size - 1, (3, c.model_length), generator=g)
    model.zero_grad()
    saved = [0]
    inside = [False]

    def pack(t):
        if inside[0]:
            saved[0] += t.numel() * t.element_size()
        return t

    hooks = [b.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)) for b in model.blocks]
    hooks += [b.register_forward_hook(lambda *a: inside.__setitem__(0, False)) for b in model.blocks]
    torch.manual_seed(seed + 1)  # dropout
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nelbo(model, x0, block, DiffusionConfig(), c.mask_id, g).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return (
        float(loss.detach()),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        saved[0],
    )


@pytest.mark.parametrize("family", ["dit", "llama"])
@pytest.mark.parametrize("block", [4, 32])
def test_activation_checkpointing_gives_the_plain_gradients(family, block):
    model = _models()[family]
    loss, grads, saved = _step(model, block, seed=block)
    model.set_checkpointing(True)
    loss_ac, grads_ac, saved_ac = _step(model, block, seed=block)
    assert loss_ac == loss
    assert grads.keys() == grads_ac.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(grads_ac[name], g, atol=1e-7, rtol=1e-5, msg=name)
    assert saved_ac < saved / 4, (saved_ac, saved)  # the layers kept (almost) nothing
    with torch.no_grad():  # no autograd, no checkpoint: the same forward
        model.eval()
        x = torch.randint(0, 97, (2, model.config.model_length))
        torch.testing.assert_close(model(x, 4), model.set_checkpointing(False)(x, 4))


def test_chunked_loss_equals_the_whole_one():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 49, (37,))
    weights = torch.rand(37)  # per-row weights, as the 1/t of the NELBO
    whole = masked_token_loss(F.linear(h, w, b), t, 49)
    (whole * weights).sum().backward()
    ref = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    chunked = token_nll(h, w, b, t, 49, chunk_elements=5 * 50)  # 8 chunks of 5 rows
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)  # a short tail chunk rounds on its own
    for x, r in zip((h, w, b), ref):
        torch.testing.assert_close(x.grad, r, atol=1e-6, rtol=1e-5)
    assert torch.isinf(F.linear(h, w, b)).sum() == 0 and chunked.isfinite().all()
    with torch.no_grad():
        torch.testing.assert_close(
            token_nll(h, w, None, t, 49, chunk_elements=100), masked_token_loss(F.linear(h, w), t, 49)
        )


@pytest.mark.parametrize("family", ["dit", "llama"])
def test_loss_inside_the_forward_equals_the_loss_of_the_logits(family, monkeypatch):
    """`model(..., targets=)` is the loss of `model(..., select=)`'s logits, also when the rows go
    in chunks; its output is [N] float32, so no wrapper sees [N, V] logits."""
    model = _models()[family].eval()
    c = model.config
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(3, c.vocab_size - 1, (2, c.model_length), generator=g)
    masked = torch.rand(x0.shape, generator=g) < 0.5
    masked[:, 0] = False
    xt = torch.where(masked, c.mask_id, x0)
    idx = masked.reshape(-1).nonzero().squeeze(1)
    ref = masked_token_loss(model(xt, 4, x0=x0, select=idx), x0.reshape(-1)[idx], c.mask_id)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(diffusion, "LOSS_CHUNK_ELEMENTS", 7 * c.vocab_size)  # chunks of 7 rows
    got = model(xt, 4, x0=x0, select=idx, targets=x0.reshape(-1)[idx])
    assert got.shape == (len(idx),) and got.dtype == torch.float32 and len(idx) > 14
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


class Deadline(BaseException):
    """What a benchmark's time limit raises (not an Exception: no handler may swallow it)."""


def test_a_flex_compile_failure_falls_back_to_the_dense_mask(capsys):
    """Never to the uncompiled flex kernel (it materialises [B, H, S, S] scores): SDPA with the
    same mask, one warning, and from then on no new compile attempt for that mask kind."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 8) for _ in range(3))
    block_mask = attention.flex_mask("train", 4, 32, torch.device("cpu"))
    dense = attention.dense_mask("train", 4, 32, torch.device("cpu"))
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("backend='inductor' raised: no working triton")  # dynamo's errors derive from it

    def deadline(*args):
        raise Deadline()

    attention.FLEX_FAILED.discard("train")
    try:
        with pytest.raises(Deadline):
            attention.compiled_flex_or_dense(q, k, v, "train", block_mask, flex=deadline)
        assert "train" not in attention.FLEX_FAILED
        out = attention.compiled_flex_or_dense(q, k, v, "train", block_mask, flex=broken)
        again = attention.compiled_flex_or_dense(q, k, v, "train", block_mask, flex=broken)
    finally:
        attention.FLEX_FAILED.discard("train")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert err.count("compiling flex_attention failed") == 1 and "dense mask" in err
    assert torch.equal(attention.dense_of(block_mask), dense)


def test_rotary_frequencies_survive_a_bf16_buffer():
    """FSDP's mixed precision casts buffers to bf16; the angles must stay those of float32."""
    ref = Rotary(64).cos_sin(0, 1024, torch.device("cpu"))
    r = Rotary(64)
    r.load_state_dict(Rotary(64).state_dict())
    r.to(torch.bfloat16)
    assert r.inv_freq.dtype == torch.bfloat16
    got = r.cos_sin(0, 1024, torch.device("cpu"))
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)


def test_global_batch_rows_and_order_do_not_depend_on_the_process_count():
    one = RowSchedule(200, 8, 2, 1, seed=5)
    two = RowSchedule(200, 4, 2, 2, seed=5)
    for step in range(3):
        for micro in range(2):
            both = np.concatenate([two.indices(step, micro, p) for p in range(2)])
            assert both.tolist() == one.indices(step, micro, 0).tolist()


def test_optimizer_state_by_name_round_trips():
    model = tiny_model(32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 97, (2, 32)), 4).float().square().mean().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    state = sharding.optimizer_state(model, opt, names)
    assert "blocks.0.attn_qkv.weight" in state["state"]
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sharding.load_optimizer_state(model, fresh, state, names)
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a checkpoint from before: numbered
    sharding.load_optimizer_state(model, old, opt.state_dict(), names)
    for o in (fresh, old):
        for p in model.parameters():
            torch.testing.assert_close(o.state[p]["exp_avg"], opt.state[p]["exp_avg"], atol=0, rtol=0)
    assert not sharding.is_sharded(model)


@pytest.mark.slow
def test_checkpointed_layers_compile_without_a_graph_break():
    """`did train` compiles the layer loop on CUDA: the checkpoint inside each layer is traced
    (dynamo's checkpoint operator), not broken out, and the gradients stay the plain ones.
    aot_eager: dynamo and autograd as inductor sees them, without its minutes of codegen here."""
    from torch._dynamo.utils import counters

    plain, compiled = tiny_model(32).train(), tiny_model(32).train()
    compiled.set_checkpointing(True).compile_blocks(backend="aot_eager")
    counters.clear()
    x0 = torch.randint(3, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, compiled):
        nelbo(model, x0, 4, DiffusionConfig(), 50257, torch.Generator().manual_seed(1)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-7, rtol=1e-5, msg=name)
