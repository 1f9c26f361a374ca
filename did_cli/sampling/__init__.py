"""Sampling: drafting with small blocks, refinement of the least confident tokens, and the
sampler core both share.

    from did_cli.sampling import DraftConfig, RefineConfig, draft, refine
    drafts = list(draft(model, DraftConfig(n=8, block_size=4)))
    refined = list(refine(model, drafts, RefineConfig(stages=[(None, 0.25)])))

Modules, in the order a sample goes through them: `config` (the settings, no torch), `prompts`
(fixed prompt and suffix tokens), `core` (the sampler: nucleus, Gumbel-max, the fill loop),
`drafting`, `refinement`, and the fast GPU path `fast` with its CUDA-graph step `graph`.
Names are imported on first use, so reading the settings does not import torch.
"""

import importlib

_NAMES = {
    "SamplerConfig": "sampler_config",
    "DraftConfig": "sampler_config",
    "RefineConfig": "sampler_config",
    "parse_stages": "sampler_config",
    "draft": "drafting",
    "refine": "refinement",
    "check_record": "refinement",
    "read_prompts": "prompts",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"did_cli.sampling.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'did_cli.sampling' has no attribute {name!r}")


__all__ = list(_NAMES)
