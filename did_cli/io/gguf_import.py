"""GGUF files of the Llama family (architectures llama, qwen2, qwen3) -> our `LlamaConfig` and
state dict, through the Hugging Face names of `did_cli.io.hf_import` (one strict conversion).

Hyper-parameters come from the GGUF metadata, tensors are dequantised to float32 with the
`gguf` package. llama.cpp's converter reorders the rows of Llama's q and k projections (within
each head, the two rotary halves are interleaved for its rotary kernel); Qwen2 and Qwen3 are
stored as they are. We undo the reordering, so the weights are Hugging Face's again.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from did_cli.core.llama_config import LlamaConfig
from did_cli.errors import DidError
from did_cli.io.hf_import import HF_FAMILIES, config_from_hf, hf_state_to_ours
from did_cli.util import first_line

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def reader(path: Path) -> Any:
    """A `gguf.GGUFReader` of `path`; DidError naming the file when it cannot be read."""
    try:
        import gguf
    except ImportError:
        raise DidError("reading GGUF needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise DidError(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: gguf raises many types
        raise DidError(f"{path}: not a readable GGUF file ({first_line(e)})") from None


def metadata(r: Any) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (token lists left out)."""
    out = {}
    for key, field in r.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            out[key] = len(field.data)  # only their count matters here
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field type this gguf version cannot decode: unused here
            continue
    return out


def _one(meta: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, list):  # per-layer values: only uniform ones are supported
        if len(set(value)) != 1:
            raise DidError(f"{where}: {key} differs between layers, which is not supported")
        value = value[0]
    if value is None:
        raise DidError(f"{where}: missing metadata {key}")
    return value


def _rope_scaling(meta: dict[str, Any], arch: str, where: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind == "none" and factor is not None and float(factor) != 1.0:
        kind = "linear"  # older files only store the linear factor
    if kind == "none":
        return None
    if kind != "linear":
        raise DidError(f"{where}: rope scaling type {kind!r} is not supported (only linear)")
    return {"rope_type": "linear", "factor": float(factor)}


def hf_config_of(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, Any]:
    """The Hugging Face config.json dict the GGUF metadata describes; `shapes`: each tensor's
    shape in PyTorch order (the vocabulary is the embedding's row count)."""
    tensor_names = set(shapes)
    arch = meta.get("general.architecture")
    if arch not in HF_FAMILIES:
        raise DidError(f"{where}: architecture {arch!r} is not supported (only {', '.join(HF_FAMILIES)})")
    if "rope_freqs.weight" in tensor_names:
        raise DidError(f"{where}: tensor rope_freqs.weight (llama3 rope scaling) is not supported")
    heads = int(_one(meta, f"{arch}.attention.head_count", where))
    hidden = int(_one(meta, f"{arch}.embedding_length", where))
    head_dim = int(_one(meta, f"{arch}.attention.key_length", where, hidden // heads))
    if int(_one(meta, f"{arch}.attention.value_length", where, head_dim)) != head_dim:
        raise DidError(f"{where}: key and value head widths differ, which is not supported")
    if int(_one(meta, f"{arch}.rope.dimension_count", where, head_dim)) != head_dim:
        raise DidError(f"{where}: partial rotary embeddings are not supported")
    embd = shapes.get("token_embd.weight")
    vocab = embd[0] if embd else meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    bias = "blk.0.attn_q.bias" in tensor_names
    raw = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(_one(meta, f"{arch}.block_count", where)),
        "intermediate_size": int(_one(meta, f"{arch}.feed_forward_length", where)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_one(meta, f"{arch}.attention.head_count_kv", where, heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_one(meta, f"{arch}.attention.layer_norm_rms_epsilon", where)),
        "rope_theta": float(_one(meta, f"{arch}.rope.freq_base", where, 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch, where),
        "max_position_embeddings": meta.get(f"{arch}.context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": bias and "blk.0.attn_output.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if vocab is None:
        raise DidError(f"{where}: no vocabulary size in the metadata")
    return raw


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order of a q or k projection (weight [H * Dh, D] or bias [H * Dh]):
    it stores each head's rows as (pair, half) where Hugging Face has (half, pair)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str, where: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    if m is None or m.group(2) not in LAYER_NAMES:
        raise DidError(f"{where}: unexpected tensor {name}")
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, our float32 state dict) of a Llama/Qwen2/Qwen3 GGUF file (strict)."""
    import gguf

    path = Path(path)
    where = str(path)
    r = reader(path)
    meta = metadata(r)
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in r.tensors}
    raw = hf_config_of(meta, shapes, where)
    cfg = config_from_hf(raw, where)
    tensors: dict[str, torch.Tensor] = {}
    for t in r.tensors:
        hf = _hf_name(t.name, where)
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise DidError(
                f"{where}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantise"
            ) from None
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shapes[t.name]))
        if raw["model_type"] == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            w = unpermute_rotary(w, cfg.n_heads if t.name.split(".")[-2] == "attn_q" else cfg.n_kv_heads)
        tensors[hf] = w
    return cfg, hf_state_to_ours(cfg, tensors, where)
