"""did: Diffusion in Diffusion language models (block-diffusion drafting + global refinement).

The Python API (`did_cli.api`) is re-exported lazily, so `import did_cli` loads no torch:

    import did_cli as did
    model, tok = did.load_model("run/best")
    records = did.refine(model, did.draft(model, n=4, prompt="Once"))
"""

__version__ = "0.1.0"

_API = ("load_model", "draft", "refine", "gen_ppl")


def __getattr__(name: str):
    # PEP 562: import the API (and torch) on first use of one of its names
    if name in _API:
        from did_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'did_cli' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))


__all__ = list(_API)
