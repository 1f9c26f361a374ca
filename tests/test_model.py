"""Backbone structure: BD3-LM names and shapes, strict loading, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file

from did_cli.core.dit import DiT
from did_cli.core.model_config import ModelConfig, preset
from did_cli.errors import DidError
from did_cli.io.model_folder import export_state_dict, load_model, load_state_dict_strict, save_model


def bd3lm_state_dict(d: int, n_blocks: int, cond: int, vocab: int) -> dict[str, torch.Tensor]:
    """Tensors named and shaped exactly as REFERENCE.md section 2 lists them."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {
        "backbone.vocab_embed.embedding": r(vocab, d),
        "backbone.sigma_map.mlp.0.weight": r(cond, 256),
        "backbone.sigma_map.mlp.0.bias": r(cond),
        "backbone.sigma_map.mlp.2.weight": r(cond, cond),
        "backbone.sigma_map.mlp.2.bias": r(cond),
        "backbone.rotary_emb.inv_freq": r(d // 4),  # head_dim / 2 with 2 heads
        "backbone.output_layer.norm_final.weight": r(d),
        "backbone.output_layer.linear.weight": r(vocab, d),
        "backbone.output_layer.linear.bias": r(vocab),
        "backbone.output_layer.adaLN_modulation.weight": r(2 * d, cond),
        "backbone.output_layer.adaLN_modulation.bias": r(2 * d),
        "sampling_eps_min": torch.tensor(0.3),
        "sampling_eps_max": torch.tensor(0.8),
    }
    for i in range(n_blocks):
        p = f"backbone.blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": r(d),
                p + "norm2.weight": r(d),
                p + "attn_qkv.weight": r(3 * d, d),
                p + "attn_out.weight": r(d, d),
                p + "mlp.0.weight": r(4 * d, d),
                p + "mlp.0.bias": r(4 * d),
                p + "mlp.2.weight": r(d, 4 * d),
                p + "mlp.2.bias": r(d),
                p + "adaLN_modulation.weight": r(6 * d, cond),
                p + "adaLN_modulation.bias": r(6 * d),
            }
        )
    return sd


def test_bd3lm_state_dict_loads_strictly_and_runs():
    # 2 heads of dim 16: inv_freq has head_dim / 2 = 8 entries = d / 4
    cfg = ModelConfig(hidden_dim=32, n_layers=2, n_heads=2, cond_dim=16, model_length=32)
    model = DiT(cfg)
    sd = bd3lm_state_dict(32, 2, 16, cfg.vocab_size)
    extras = load_state_dict_strict(model, sd)
    assert extras == pytest.approx({"sampling_eps_min": 0.3, "sampling_eps_max": 0.8})
    assert set(export_state_dict(model)) == {k for k in sd if k.startswith("backbone.")}
    x = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        out = model(x, 4, x0=x)
    assert out.shape == (2, 32, cfg.vocab_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_strict_loading_names_the_bad_tensor(fault):
    cfg = ModelConfig(hidden_dim=32, n_layers=2, n_heads=2, cond_dim=16, model_length=32)
    sd = bd3lm_state_dict(32, 2, 16, cfg.vocab_size)
    name = "backbone.blocks.1.attn_out.weight"
    if fault == "missing":
        del sd[name]
    elif fault == "unexpected":
        sd["backbone.blocks.1.attn_out.bias"] = torch.zeros(32)
        name = "blocks.1.attn_out.bias"
    else:
        sd[name] = torch.zeros(32, 31)
    with pytest.raises(DidError, match=name.replace(".", r"\.")):
        load_state_dict_strict(DiT(cfg), sd)


def test_parameter_counts():
    assert sum(p.numel() for p in DiT(preset("tiny")).parameters()) == preset("tiny").n_params()
    # the paper's model with untied 50258-row embeddings (REFERENCE.md: ~169.6M)
    assert preset("small").n_params() == 169_627_218


def test_save_load_round_trip(tmp_path):
    model = tiny_model(length=32)
    save_model(model, tmp_path / "ck", clip=(0.45, 0.95))
    loaded, info = load_model(tmp_path / "ck")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert info["clip"] == pytest.approx((0.45, 0.95))
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_loading_errors_are_one_line(tmp_path):
    with pytest.raises(DidError, match="no checkpoint in"):
        load_model(tmp_path)
    model = tiny_model(length=32)
    save_model(model, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DidError, match="unreadable safetensors"):
        load_model(tmp_path / "ck")
    sd = {k: v.to(torch.int32) for k, v in export_state_dict(model).items()}
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(DidError, match="dtype"):
        load_model(tmp_path / "ck")


def test_cached_step_equals_uncached_pass(tiny):
    x = torch.randint(0, 50257, (3, 64))
    with torch.no_grad():
        full = tiny(x, 8)
        cache = tiny.new_cache(3, 64)
        outs = [tiny.step(x[:, s : s + 8], cache, commit=True) for s in range(0, 64, 8)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_static_step_and_graph_wrapper_equal_dynamic_step(tiny):
    from did_cli.sampling.graph import GraphedStep

    x = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        ref_cache = tiny.new_cache(2, 64)
        ref = [tiny.step(x[:, s : s + 4], ref_cache, commit=True) for s in range(0, 64, 4)]
        cache = tiny.new_cache(2, 64)
        fast = GraphedStep(tiny, cache, batch=2, block=4)  # eager on CPU, CUDA graph on GPU
        got = []
        for s in range(0, 64, 4):
            got.append(fast(x[:, s : s + 4]).clone())
            fast.commit(x[:, s : s + 4])
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), atol=1e-5, rtol=1e-5)
    assert cache.length == 64 and int(cache.start) == 64
