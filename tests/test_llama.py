"""The Llama-family backbone: its passes agree with each other (training pass vs a per-block
reference, KV-cached steps vs the uncached pass, static vs eager step, flex vs dense), with the
shift on and off; the samplers run on it and never emit [MASK]; its config round-trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from llama_helpers import GPT2_VOCAB, tiny_llama
from nelbo_reference import nelbo_loop_reference

from did_cli.core import attention
from did_cli.core.backbones import build_backbone, config_from_dict, family_of
from did_cli.core.diffusion import corrupt, masked_token_loss, nelbo, sample_t
from did_cli.core.llama import LlamaDiffusion, append_mask_row
from did_cli.core.llama_config import LlamaConfig
from did_cli.core.model_config import DiffusionConfig, ModelConfig
from did_cli.errors import UsageError
from did_cli.sampling import DraftConfig, RefineConfig, draft, refine
from did_cli.sampling.fast import low_precision_copy
from did_cli.sampling.graph import EagerStep, GraphedStep

VARIANTS = {
    "gqa-tied": dict(),
    "mha-untied-bias": dict(n_kv_heads=4, tie_embeddings=False, attention_bias=True, o_bias=True),
    "qwen3-like": dict(qk_norm=True, head_dim=12, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def _noisy(model, b: int, block: int, seed: int):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(3, c.source_vocab_size, (b, c.model_length), generator=g)
    x0[:, 0] = c.bos_id
    t = sample_t(b, c.model_length // block, DiffusionConfig(), generator=g)
    xt, masked, t_tok = corrupt(x0, t, block, c.mask_id, g)
    return x0, xt, masked, t_tok


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("block", [1, 4, 16])
def test_training_pass_equals_per_block_reference(variant, shift, block):
    """Logits of the `[x_t ; x_0]` pass at masked positions == each block denoised through the
    sampling pass from the clean earlier blocks and its own noisy tokens."""
    model = tiny_llama(shift=shift, **VARIANTS[variant])
    x0, xt, masked, t_tok = _noisy(model, 3, block, seed=block)
    n = x0.shape[1]
    with torch.no_grad():
        got = model(xt, block, x0=x0, select=masked)
        ref = torch.zeros(3, n, model.config.vocab_size)
        for s in range(0, n, block):
            inp = torch.cat([x0[:, :s], xt[:, s : s + block]], dim=1)
            ref[:, s : s + block] = model(inp, block)[:, s : s + block]
        mid = model.config.mask_id
        torch.testing.assert_close(got, ref[masked], atol=1e-5, rtol=1e-5)
        vec = (masked_token_loss(got, x0[masked], mid) / t_tok[masked]).sum() / (3 * (n - 1))
        loop = nelbo_loop_reference(model, x0, xt, t_tok, block, mid)
    torch.testing.assert_close(vec, loop, atol=1e-5, rtol=1e-5)


def test_shift_takes_the_state_before_each_position():
    """With the shift, block size 1 gives at j what the unshifted model gives at j-1 (the same
    weights: a causal model's state at j-1 predicts j)."""
    on, off = tiny_llama(shift=True), tiny_llama(shift=False)
    x = torch.randint(3, 97, (2, 16))
    with torch.no_grad():
        a, b = on(x, 1), off(x, 1)
        assert torch.equal(a[:, 1:], b[:, :-1])
        assert not torch.allclose(a[:, 1:], b[:, 1:])
        assert torch.equal(on(x, 1, x0=x), a)  # training pass at block 1 = the causal pass


def test_select_forms_agree_and_nelbo_runs():
    model = tiny_llama()
    x0, xt, masked, _ = _noisy(model, 2, 4, seed=3)
    with torch.no_grad():
        full = model(xt, 4, x0=x0)
        by_mask = model(xt, 4, x0=x0, select=masked)
        by_index = model(xt, 4, x0=x0, select=masked.reshape(-1).nonzero().squeeze(1))
    assert full.shape == (2, 16, model.config.vocab_size)
    assert torch.equal(by_mask, by_index)
    torch.testing.assert_close(by_mask, full[masked])
    out = nelbo(model, x0, 4, DiffusionConfig(), model.config.mask_id, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.n_masked > 0


def _cached_vs_uncached(model, step, x, block, skip=()):
    """Per block: the step's logits with the block half masked vs the uncached pass over the
    prefix; then the block is committed (blocks in `skip` are only committed, as refinement
    does for blocks with nothing to regenerate)."""
    c = model.config
    n = x.shape[1]
    for s in range(0, n, block):
        e = s + block
        noisy = x.clone()
        noisy[:, s + 1 : e : 2] = c.mask_id
        if s not in skip:
            got = step(noisy[:, s:e])
            ref = model(noisy[:, :e], block)[:, s:e]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        step.commit(x[:, s:e])


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("variant", ["gqa-tied", "qwen3-like"])
def test_kv_cached_steps_equal_the_uncached_pass(variant, shift):
    """Eager and static cached steps give the uncached block-causal pass's logits, including a
    block that follows one that was only committed; the cache holds n_kv_heads heads."""
    model = tiny_llama(length=24, shift=shift, **VARIANTS[variant])
    x = torch.randint(3, 97, (3, 24))
    x[:, 0] = 1
    with torch.no_grad():
        for make in (
            lambda: EagerStep(model, model.new_cache(3, 24)),
            lambda: GraphedStep(model, model.new_cache(3, 24), 3, 4, use_graph=False, compile=False),
        ):
            step = make()
            assert step.cache.k[0].shape == (3, model.config.n_kv_heads, 24, model.config.head_dim)
            _cached_vs_uncached(model, step, x, 4, skip=(8,))
            step.reset()  # a second batch on the same step: nothing stale is read
            _cached_vs_uncached(model, step, x.flip(0), 4)


def test_eager_cache_select_keeps_the_shift_state():
    model = tiny_llama(length=16)
    x = torch.randint(3, 97, (3, 16))
    with torch.no_grad():
        step = EagerStep(model, model.new_cache(3, 16))
        step.commit(x[:, :4])
        step.select(torch.tensor([0, 2]))
        got = step(x[[0, 2], 4:8])
        ref = model(x[[0, 2], :8], 4)[:, 4:8]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not attention.HAS_FLEX, reason="this torch has no FlexAttention")
@pytest.mark.parametrize("block", [1, 4])
def test_flex_forward_equals_dense(block):
    model = tiny_llama(length=32, **VARIANTS["qwen3-like"])
    x0, xt, masked, _ = _noisy(model, 2, block, seed=5)
    with torch.no_grad():
        attention.set_backend("sdpa")
        dense = model(xt, block, x0=x0, select=masked), model(xt, block)
        attention.set_backend("flex")
        try:
            flex = model(xt, block, x0=x0, select=masked), model(xt, block)
        finally:
            attention.set_backend("auto")
    for a, b in zip(dense, flex):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_config_round_trip_and_parameter_count():
    for overrides in VARIANTS.values():
        model = tiny_llama(**overrides)
        d = model.config.to_dict()
        assert d["family"] == "llama" and family_of(d) == "llama"
        assert config_from_dict(d) == model.config
        assert model.config.n_params() == sum(p.numel() for p in model.parameters())
        assert isinstance(build_backbone(model.config), LlamaDiffusion)
    assert family_of(ModelConfig().to_dict()) == "dit"
    assert isinstance(config_from_dict(ModelConfig().to_dict()), ModelConfig)


def test_unsupported_rope_scaling_is_refused_in_one_line():
    with pytest.raises(UsageError) as e:
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert "'yarn'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="low_freq_factor"):
        LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_mask_row_is_the_mean_embedding_and_never_changes_the_loss():
    model = tiny_llama(tie_embeddings=False)
    c = dataclasses.replace(model.config, vocab_size=97, mask_id=96)
    state = {k: v for k, v in model.state_dict().items()}
    state["vocab_embed.embedding"] = state["vocab_embed.embedding"][:97]
    state["lm_head.weight"] = state["lm_head.weight"][:97]
    c2, s2 = append_mask_row(c, state)
    assert (c2.vocab_size, c2.mask_id) == (98, 97)
    emb = s2["vocab_embed.embedding"]
    torch.testing.assert_close(emb[97], emb[:97].mean(0))
    assert torch.equal(s2["lm_head.weight"][97], torch.zeros(32))
    logits = torch.randn(5, 98)
    logits[:, 97] = 100.0  # a mask logit that would dominate if it were not suppressed
    target = torch.randint(0, 97, (5,))
    ref = torch.nn.functional.cross_entropy(logits[:, :97], target, reduction="none")
    torch.testing.assert_close(masked_token_loss(logits, target, 97), ref)


def _gpt2_llama(shift: bool = True) -> LlamaDiffusion:
    """A tiny model over the bundled GPT-2 vocabulary whose [MASK] output row is huge: a sampler
    that forgot to suppress it would emit [MASK] everywhere."""
    model = tiny_llama(length=32, std=0.05, tie_embeddings=False, shift=shift, **GPT2_VOCAB)
    with torch.no_grad():
        model.lm_head.weight[50257] = 50.0 * model.vocab_embed.embedding.abs().mean()
    return model


@pytest.mark.parametrize("shift", [True, False])
def test_draft_and_refine_run_on_llama_and_never_emit_mask(tok, shift):
    """`did draft`'s code: cached, uncached and static-step drafting give the same tokens; refine
    (a block stage and the global pass) runs on the drafts; [MASK] never appears."""
    model = _gpt2_llama(shift)
    base = dict(n=2, length=32, block_size=4, batch_size=2, seed=3, top_p=1.0, min_entropy=None)
    runs = {
        "cached": DraftConfig(**base, fast_path="off"),
        "uncached": DraftConfig(**base, use_cache=False),
        "static": DraftConfig(**base, fast_path="static"),
    }
    recs = {k: list(draft(model, cfg, tokenizer=tok, progress=False)) for k, cfg in runs.items()}
    toks = {k: [r["tokens"] for r in v] for k, v in recs.items()}
    assert toks["cached"] == toks["uncached"] == toks["static"]
    assert all(50257 not in t for t in toks["cached"])
    refined = {}
    for p in ("off", "static"):
        cfg = RefineConfig(stages=[(8, 0.3), (None, 0.25)], batch_size=2, top_p=1.0, fast_path=p)
        refined[p] = [r["tokens"] for r in refine(model, recs["cached"], cfg, tokenizer=tok, progress=False)]
    assert refined["off"] == refined["static"]
    assert refined["off"] != toks["cached"]  # tokens were regenerated
    assert all(50257 not in t for t in refined["off"])


def test_low_precision_copy_computes_what_autocast_does():
    """The bf16 weight copy of the fast path, on this model: bit-identical under bf16 autocast."""
    model = tiny_llama(tie_embeddings=False, attention_bias=True)
    low = low_precision_copy(model, torch.bfloat16)
    x = torch.randint(3, 97, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x, 4), low(x, 4))
    assert low.vocab_embed.embedding is model.vocab_embed.embedding
    assert low.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_static_step_and_blocks_equal_eager():
    """Inductor's static step (fullgraph, what the CUDA graph captures) and the compiled layers
    (`compiled_blocks`, the training and global passes) equal the eager code."""
    model = tiny_llama(length=24, **VARIANTS["qwen3-like"])
    x = torch.randint(3, 97, (2, 24))
    x[:, 0] = 1
    with torch.no_grad():
        eager = GraphedStep(model, model.new_cache(2, 24), 2, 4, use_graph=False, compile=False)
        compiled = GraphedStep(model, model.new_cache(2, 24), 2, 4, use_graph=False, compile=True)
        assert compiled.compiled
        for s in range(0, 24, 4):
            torch.testing.assert_close(
                compiled(x[:, s : s + 4]), eager(x[:, s : s + 4]), atol=1e-5, rtol=1e-5
            )
            compiled.commit(x[:, s : s + 4])
            eager.commit(x[:, s : s + 4])
        run = model.compiled_blocks()
        torch.testing.assert_close(model.hidden(x, 4, run=run), model.hidden(x, 4), atol=1e-5, rtol=1e-5)
