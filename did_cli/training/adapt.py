"""`did adapt`: a pretrained causal LM becomes a block-diffusion model, then trains with the same
loop as `did train` (`did_cli.training.trainer`).

    from did_cli.training import AdaptConfig, train
    train(AdaptConfig(source="SmolLM2-135M.gguf", data="data/", out="run/", steps=500))

(`did_cli.training.setup.build_model` calls `adapted_model` for an `AdaptConfig`.)

The model is the source's weights in the Llama-family backbone (`did_cli.core.llama`), with:
- the data's tokenizer checked against the source's (fingerprints; the names may differ, e.g. a
  GGUF file and the folder its tokenizer was saved to);
- the vocabulary cut to the tokenizer's ids (rows beyond them are padding the tokenizer never
  produces, e.g. Qwen2's) and a [MASK] row appended after them: the mean embedding, its logit
  suppressed everywhere (SmolLM2's 49,152 ids are all in use, so there is no free id to take);
- BOS and EOS those of the prepared rows (`did prepare` decides them), so drafts start with the
  token training rows start with;
- the next-token shift (`--shift`, on by default): at block size 1 the untouched model is the
  source model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from did_cli.core.llama import LlamaDiffusion, append_mask_row
from did_cli.core.llama_config import LlamaConfig
from did_cli.errors import DidError
from did_cli.io.pretrained import read_pretrained
from did_cli.io.tokenizer import load_tokenizer
from did_cli.training.adapt_config import AdaptConfig, check_adapt_config
from did_cli.util import warn


def source_tokenizer_name(source: str, data: Any) -> str:
    """The tokenizer name the adapted model carries: the source's own when it loads (refused in
    one line when it is not the data's), else the data's (a folder without tokenizer files)."""
    meta = data.meta
    try:
        tok = load_tokenizer(source)
    except DidError as e:
        warn(
            f"--from {source}: no tokenizer loads from it ({str(e)[:120]}); trusting the data's "
            f"tokenizer {meta['tokenizer']!r}"
        )
        return str(meta["tokenizer"])
    recorded = meta.get("tokenizer_fingerprint")
    if (recorded and tok.fingerprint != recorded) or tok.vocab_size != data.vocab_size:
        raise DidError(
            f"data in {data.path} was tokenised with {meta['tokenizer']!r} but --from {source} uses "
            f"tokenizer {tok.name!r} (another vocabulary); re-run `did prepare --tokenizer {source}`"
        )
    return tok.name


def fit_vocabulary(
    cfg: LlamaConfig, state: dict[str, torch.Tensor], n_ids: int, source: str
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Keep the first `n_ids` rows of the embedding and output layer (the tokenizer's ids):
    rows past them are padding that no text encodes to, and a sampler must never emit them."""
    rows = cfg.vocab_size
    if n_ids > rows:
        raise DidError(
            f"--from {source}: the tokenizer has {n_ids} ids but the model only {rows} embedding rows"
        )
    if n_ids == rows:
        return cfg, state
    state = dict(state)
    for key in ("vocab_embed.embedding", "lm_head.weight"):
        if key in state:
            state[key] = state[key][:n_ids].clone()
    return dataclasses.replace(cfg, vocab_size=n_ids, source_vocab_size=n_ids), state


def adapted_model(cfg: AdaptConfig, data: Any) -> LlamaDiffusion:
    """The model `did adapt` starts from (train mode off, float32): the source's weights with the
    data's vocabulary, [MASK] row, BOS/EOS and length (see the module docstring)."""
    check_adapt_config(cfg)
    meta = data.meta
    tokenizer = source_tokenizer_name(cfg.source, data)
    mc, state = read_pretrained(cfg.source)
    n_ids = int(meta.get("mask_id", data.vocab_size - 1))
    mc, state = append_mask_row(*fit_vocabulary(mc, state, n_ids, cfg.source))
    mc = dataclasses.replace(
        mc,
        model_length=data.seq_len,
        shift=cfg.shift,
        dropout=cfg.dropout or 0.0,
        bos_id=int(meta.get("bos_id", mc.bos_id)),
        eos_id=int(meta.get("eos_id", mc.eos_id)),
        tokenizer=tokenizer,
        source=str(cfg.source),
    )
    model = LlamaDiffusion(mc)
    model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = ["adapted_model", "fit_vocabulary", "source_tokenizer_name"]
