"""Hugging Face causal LMs of the Llama family (model_type llama, qwen2, qwen3) -> our
`LlamaConfig` and state dict (`did_cli.core.llama`).

Only config.json and the safetensors files are read: no transformers model is built and no
remote code can run. Conversion is strict: every source tensor is used (rotary buffers of old
checkpoints excepted), every one of ours is filled, and each shape is checked; errors name the
tensor and the file. The GGUF importer (`did_cli.io.gguf_import`) renames its tensors to these
names and goes through the same conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from did_cli.core.llama_config import LlamaConfig
from did_cli.errors import DidError
from did_cli.io import bounded
from did_cli.util import first_line

HF_FAMILIES = ("llama", "qwen2", "qwen3")
LAYER = "model.layers.{i}."
INDEX_FILE = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------ config


def _first_id(value: Any) -> int | None:
    """A token id from config.json (some list several EOS ids: the first is the document end)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def _rope(raw: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling dict or None) from either config.json form: transformers 5's
    `rope_parameters`, or the older `rope_theta` + `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    if float(params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
        raise DidError(f"{where}: partial rotary embeddings are not supported")
    scaling = raw.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if kind == "llama3" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = raw.get("max_position_embeddings")
    return theta, scaling


def _refuse_unsupported(raw: dict[str, Any], where: str) -> None:
    model_type = raw.get("model_type")
    if model_type not in HF_FAMILIES:
        raise DidError(f"{where}: model_type {model_type!r} is not supported (only {', '.join(HF_FAMILIES)})")
    if raw.get("hidden_act", "silu") != "silu":
        raise DidError(f"{where}: hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise DidError(f"{where}: mlp_bias is not supported")
    layer_types = raw.get("layer_types") or []
    if raw.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise DidError(f"{where}: sliding-window attention is not supported")


def config_from_hf(raw: dict[str, Any], where: str, tied: bool | None = None) -> LlamaConfig:
    """Our config of a Hugging Face config.json dict (`where` names it in errors). `tied`: whether
    the weights hold no separate output layer, used when config.json does not say. The result
    describes the source as it is: mask_id is a placeholder (the last id) until a [MASK] row is
    appended or chosen (`did_cli.io.pretrained.load_pretrained`); model_length is the default."""
    _refuse_unsupported(raw, where)
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        vocab = int(raw["vocab_size"])
        theta, scaling = _rope(raw, where)
        bos, eos = _first_id(raw.get("bos_token_id")), _first_id(raw.get("eos_token_id"))
        family = raw["model_type"]
        bias = bool(raw.get("attention_bias", False))
        tie = raw.get("tie_word_embeddings", tied)
        return LlamaConfig(
            vocab_size=vocab,
            source_vocab_size=vocab,
            hidden_dim=hidden,
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw["intermediate_size"]),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(tie if tie is not None else False),
            attention_bias=True if family == "qwen2" else bias,  # Qwen2: q/k/v biases, no o bias
            o_bias=bias and family != "qwen2",
            qk_norm=family == "qwen3",
            mask_id=vocab - 1,
            bos_id=bos if bos is not None else (eos if eos is not None else 0),
            eos_id=eos if eos is not None else (bos if bos is not None else 0),
        )
    except KeyError as e:
        raise DidError(f"{where}: missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise DidError(f"{where}: {first_line(e)}") from None


# ------------------------------------------------------------------------------------ tensors


class _Taker:
    """Hands out source tensors by name, checking shape and dtype; remembers what was taken."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        self.tensors, self.where, self.used = tensors, where, set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise DidError(f"{self.where}: missing tensor {name}")
        if not t.is_floating_point():
            raise DidError(f"{self.where}: tensor {name} has dtype {t.dtype}, expected floating point")
        if tuple(t.shape) != tuple(shape):
            raise DidError(f"{self.where}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        self.used.add(name)
        return t.float()

    def check_all_used(self) -> None:
        # rotary frequencies of old checkpoints follow from the config: nothing to load
        left = sorted(k for k in self.tensors if k not in self.used and not k.endswith("rotary_emb.inv_freq"))
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise DidError(f"{self.where}: unexpected tensor {left[0]}{more}")


def _layer(cfg: LlamaConfig, take: _Taker, i: int) -> dict[str, torch.Tensor]:
    d, dh, hq, hk = cfg.hidden_dim, cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    p, ours = LAYER.format(i=i), f"blocks.{i}."
    a = p + "self_attn."
    out = {
        ours + "attn_norm.weight": take(p + "input_layernorm.weight", (d,)),
        ours + "qkv_proj.weight": torch.cat(
            [
                take(a + "q_proj.weight", (hq, d)),
                take(a + "k_proj.weight", (hk, d)),
                take(a + "v_proj.weight", (hk, d)),
            ]
        ),
        ours + "o_proj.weight": take(a + "o_proj.weight", (d, hq)),
        ours + "mlp_norm.weight": take(p + "post_attention_layernorm.weight", (d,)),
        ours + "gate_up_proj.weight": torch.cat(
            [
                take(p + "mlp.gate_proj.weight", (cfg.intermediate_size, d)),
                take(p + "mlp.up_proj.weight", (cfg.intermediate_size, d)),
            ]
        ),
        ours + "down_proj.weight": take(p + "mlp.down_proj.weight", (d, cfg.intermediate_size)),
    }
    if cfg.attention_bias:
        out[ours + "qkv_proj.bias"] = torch.cat(
            [take(a + "q_proj.bias", (hq,)), take(a + "k_proj.bias", (hk,)), take(a + "v_proj.bias", (hk,))]
        )
    if cfg.o_bias:
        out[ours + "o_proj.bias"] = take(a + "o_proj.bias", (d,))
    if cfg.qk_norm:
        out[ours + "q_norm.weight"] = take(a + "q_norm.weight", (dh,))
        out[ours + "k_norm.weight"] = take(a + "k_norm.weight", (dh,))
    return out


def hf_state_to_ours(
    cfg: LlamaConfig, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Our float32 state dict from Hugging Face tensor names (strict; `where` names the file)."""
    take = _Taker(tensors, where)
    v, d = cfg.vocab_size, cfg.hidden_dim
    state = {"vocab_embed.embedding": take("model.embed_tokens.weight", (v, d))}
    for i in range(cfg.n_layers):
        state.update(_layer(cfg, take, i))
    state["norm.weight"] = take("model.norm.weight", (d,))
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = take("lm_head.weight", (v, d))
    elif "lm_head.weight" in tensors:  # some tied checkpoints store the shared matrix twice
        if not torch.equal(take("lm_head.weight", (v, d)), state["vocab_embed.embedding"]):
            raise DidError(f"{where}: tensor lm_head.weight differs from the embedding of a tied model")
    take.check_all_used()
    return state


# ------------------------------------------------------------------------------------ folders


def read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise DidError(f"{path}: missing")
    raw = bounded.read_json(path)  # size-limited, checked JSON integers
    if not isinstance(raw, dict):
        raise DidError(f"{path}: expected a JSON object")
    return raw


def read_safetensors(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a folder's model.safetensors, or of the shards its index names; and the
    name of what was read, for errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DidError(f"{index}: no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        raise DidError(f"{folder}: no model.safetensors or {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except (SafetensorError, OSError) as e:
            raise DidError(f"{f}: unreadable safetensors file ({first_line(e)})") from None
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise DidError(f"{f}: tensor {dup[0]} is also in another shard")
        tensors.update(part)
    return tensors, str(single if len(files) == 1 else folder)


def read_hf_folder(folder: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of a Hugging Face model folder (config.json + safetensors)."""
    folder = Path(folder)
    raw = read_json(folder / "config.json")
    _refuse_unsupported(raw, str(folder / "config.json"))
    tensors, where = read_safetensors(folder)
    cfg = config_from_hf(raw, str(folder / "config.json"), tied="lm_head.weight" not in tensors)
    return cfg, hf_state_to_ours(cfg, tensors, where)
