"""The list of subcommands, once: name -> (module under did_cli.commands, function, one-line help).

`did_cli.cli` builds the app from it and `--config` files name their sections after it. Nothing
here imports a command, so reading the list costs nothing."""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("prepare", "prepare", "Tokenise text into memory-mapped training rows."),
    "train": ("train", "train", "Train a block-diffusion model over one or several block sizes."),
    "finetune-mixscale": (
        "train",
        "finetune_mixscale",
        "Mix-scale fine-tune from a checkpoint (draft block + global block).",
    ),
    "adapt": (
        "adapt",
        "adapt",
        "Adapt a pretrained causal LM (folder, GGUF, hub name) into a block-diffusion model.",
    ),
    "draft": ("sample", "draft", "Draft samples with block diffusion and record snapshot confidence."),
    "refine": ("sample", "refine", "Re-mask low-confidence tokens and regenerate them (global refine)."),
    "eval-ppl": (
        "evaluate",
        "eval_ppl",
        "Generative perplexity of samples, or test perplexity of a checkpoint.",
    ),
    "show": ("show", "show", "Write an HTML page showing drafts, refinements and confidences."),
    "quickstart": (
        "quickstart",
        "quickstart",
        "Run the whole pipeline on the bundled corpus and write a report.",
    ),
}

__all__ = ["COMMANDS"]
