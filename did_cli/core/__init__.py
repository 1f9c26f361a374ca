"""The math, with no file I/O: model configurations, the backbones (the BD3-LM DiT) on one
attention core (mask predicates, flex/SDPA, the KV cache), and the diffusion loss."""
