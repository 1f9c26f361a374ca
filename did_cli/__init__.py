"""did: Diffusion in Diffusion language models (block-diffusion drafting + global refinement)."""

__version__ = "0.1.0"
