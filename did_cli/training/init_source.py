"""Where a run's starting weights come from (`--init`): a checkpoint or run folder of ours, a
BD3-LM / MDLM folder, or a hub id when online; the learned t ranges stored with them; and, for
our own checkpoints, where in the data order the earlier run stopped."""

from __future__ import annotations

from pathlib import Path

from did_cli.errors import DidError
from did_cli.io import checkpoint as ck
from did_cli.io.bounded import read_json
from did_cli.io.schemas import check_state
from did_cli.util import first_line


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))


def fetch_init(init: str) -> Path:
    """A local checkpoint folder for --init: a folder / run folder, or a hub snapshot (online)."""
    p = Path(init).expanduser()
    if p.exists():
        return ck.resolve_checkpoint(p)
    if not _looks_like_hub_id(init):
        raise DidError(f"--init {init}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=init, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, unknown repo, gated...
        raise DidError(
            f"--init {init}: not a local folder and the hub is unreachable or lacks it ({first_line(e)})"
        ) from None
    return ck.resolve_checkpoint(folder)


def init_clip_ranges(raw_config: dict, clip: tuple[float, float] | None) -> dict[int, tuple[float, float]]:
    """Learned t ranges stored with a checkpoint: ours keep one per block size in config.json;
    a BD3-LM folder has one (sampling_eps_min/max) for its `block_size`."""
    ranges = raw_config.get("clip_ranges")
    if isinstance(ranges, dict):
        return {int(k): (float(v[0]), float(v[1])) for k, v in ranges.items()}
    if clip is not None and raw_config.get("block_size"):
        return {int(raw_config["block_size"]): (float(clip[0]), float(clip[1]))}
    return {}


def init_data_start(folder: Path, data_meta: dict, seed: int) -> list[int] | None:
    """Where the --init run stopped reading, when it trained on these very rows with this seed
    (our checkpoints only): a fine-tune that started over would first re-read rows the model
    has already fitted, which at small scale makes validation worse, not better."""
    path = folder / ck.STATE_DIR / "state.json"
    if not path.exists():
        return None
    try:
        st = check_state(read_json(path), str(path))
        same = (
            st.get("data_hash") is not None
            and st["data_hash"] == data_meta.get("content_hash")
            and st.get("seed") == seed
        )
        return [int(st["epoch"]), int(st["position"])] if same else None
    except (DidError, ValueError, KeyError, TypeError):
        return None
