"""Tokenizers: the bundled GPT-2 BPE (offline) or any tokenizer transformers can load.

Every diffusion model here needs one extra token, [MASK], appended after the base vocabulary
(BD3-LM / MDLM convention): for GPT-2 the base vocabulary is 50257 tokens, `mask_id` is 50257 and
the model vocabulary is 50258.

BOS and EOS of prepared rows (plain text, one document after another): `<|endoftext|>` when the
vocabulary has it, else the tokenizer's BOS and EOS. GPT-2 (50256), SmolLM2 (0) and Qwen2 use
it as the separator of pretraining documents; SmolLM2-Instruct's GGUF names `<|im_start|>` (1)
and `<|im_end|>` (2) as BOS and EOS, which mark chat turns, not documents.

    tok = load_tokenizer("gpt2")          # bundled files, no network
    tok.encode("Hello world")             # [15496, 995]
    tok = load_tokenizer("path/to/folder")  # or a .gguf file, or a hub name when reachable
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from did_cli.errors import DidError
from did_cli.io.hf_safety import from_pretrained
from did_cli.util import hub_unreachable, one_line

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GPT2_DIR = ASSETS / "gpt2"
GPT2_ALIASES = ("gpt2", "openai-community/gpt2")


DOC_SEPARATOR = "<|endoftext|>"
"""The token that separates plain-text documents, when a vocabulary has it (see above)."""


def canonical_name(name_or_path: str | os.PathLike) -> str:
    """The name stored in configs and prepared data: aliases of GPT-2 become "gpt2", a local
    file or folder its absolute path (so it means the same from any working folder)."""
    name = str(name_or_path)
    if name in GPT2_ALIASES:
        return "gpt2"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


class Tokenizer:
    """A transformers tokenizer plus the ids the diffusion model needs ([MASK], BOS, EOS)."""

    def __init__(self, hf: Any, name: str):
        self.hf = hf
        self.name = canonical_name(name)
        base = len(hf)
        self.mask_id: int = base
        self.vocab_size: int = base + 1
        vocab = hf.get_vocab()
        eos = _first_id(hf, "eos_token_id", "sep_token_id", "bos_token_id", "cls_token_id")
        bos = _first_id(hf, "bos_token_id", "cls_token_id", "eos_token_id", "sep_token_id")
        if isinstance(vocab.get(DOC_SEPARATOR), int):
            bos = eos = vocab[DOC_SEPARATOR]
        if eos is None or bos is None:
            raise DidError(f"tokenizer {name!r} has no BOS/EOS (or CLS/SEP) token to separate documents")
        self.bos_id: int = bos
        self.eos_id: int = eos
        # Tokenisers warn when a text is longer than their model_max_length; we pack long
        # documents into rows ourselves, so that warning is noise. This is the flag
        # transformers itself sets after warning once.
        warnings = getattr(hf, "deprecation_warnings", None)
        if isinstance(warnings, dict):
            warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        self.fingerprint: str = _fingerprint(vocab)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts (the fast tokenizer parallelises this internally)."""
        if not texts:
            return []
        return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(
        self, ids: Iterable[int] | Any, *, mask_marker: str | None = None, skip_special: bool = False
    ) -> str:
        """Text of `ids`. [MASK] ids decode to "" unless `mask_marker` (e.g. "[MASK]") is given.

        Special tokens such as `<|endoftext|>` are kept unless `skip_special` is true.
        Accepts lists, numpy arrays and tensors.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if mask_marker is None:
            return self._decode([i for i in ids if i != self.mask_id], skip_special)
        # decode the runs between masks separately so each mask shows up exactly once
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i == self.mask_id:
                if run:
                    parts.append(self._decode(run, skip_special))
                    run = []
                parts.append(mask_marker)
            else:
                run.append(i)
        if run:
            parts.append(self._decode(run, skip_special))
        return "".join(parts)

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if not ids:
            return ""
        return self.hf.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def _first_id(hf: Any, *attrs: str) -> int | None:
    for a in attrs:
        v = getattr(hf, a, None)
        if isinstance(v, int):
            return v
    return None


def _fingerprint(vocab: dict[str, int]) -> str:
    """Hash of the token -> id mapping: equal fingerprints mean ids mean the same strings."""
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _looks_like_path(name: str) -> bool:
    # hub names are "name" or "org/name"; anything else is meant as a folder
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or (os.sep != "/" and os.sep in name)


def load_tokenizer(name_or_path: str | os.PathLike = "gpt2") -> Tokenizer:
    """Load a tokenizer by name or folder (cached).

    "gpt2" and "openai-community/gpt2" use the bundled GPT-2 BPE files and need no network. A
    `.gguf` file's tokenizer is converted once and cached (`did_cli.io.gguf_cache`). Anything
    else goes to `transformers.AutoTokenizer.from_pretrained` (a local folder, or a hub name
    when the hub is reachable). Raises `DidError` when it cannot be loaded.
    """
    return _load(canonical_name(name_or_path))


@contextlib.contextmanager
def _quiet_hub():
    """Silence the hub client's and transformers' retry and advisory logging for one call."""
    import logging

    names = ("huggingface_hub", "transformers", "urllib3", "filelock")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


@functools.lru_cache(maxsize=8)
def _load(name: str) -> Tokenizer:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if name == "gpt2":
        from transformers import GPT2TokenizerFast

        # from_pretrained(folder) reads vocab.json + merges.txt; the vocab_file=/merges_file=
        # keyword form has been seen to yield empty encodings silently.
        hf = GPT2TokenizerFast.from_pretrained(str(GPT2_DIR), trust_remote_code=False)
        tok = Tokenizer(hf, "gpt2")
        if tok.encode("Hello world") != [15496, 995]:
            raise DidError(
                f"bundled GPT-2 tokenizer in {GPT2_DIR} is broken (Hello world does not encode to [15496, "
                "995])"
            )
        return tok
    path = Path(name).expanduser()
    if not path.exists() and _looks_like_path(name):
        raise DidError(f"tokenizer folder {name!r} does not exist")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from did_cli.io.gguf_cache import load_gguf_tokenizer

        with _quiet_hub():
            return Tokenizer(load_gguf_tokenizer(path), name)
    # a hub name with no route to the hub: ask the local cache only (no minute of retries)
    offline = None if path.exists() else hub_unreachable()
    try:
        with _quiet_hub():
            # no remote code: a folder asking for it is refused in one line, and no prompt can
            # read stdin
            hf = from_pretrained(
                "AutoTokenizer",
                str(path) if path.exists() else name,
                "tokenizer",
                local_files_only=offline is not None,
            )
    except DidError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, HTTP errors...
        why = f"{offline}, and it is not in the local cache" if offline else one_line(e)
        raise DidError(
            f"cannot load tokenizer {name!r} (not a bundled name, a tokenizer folder, or a reachable hub "
            "name): "
            f"{why}"
        ) from None
    return Tokenizer(hf, name)
