"""`--config FILE`: options from a YAML or JSON file, under the command line.

A config file is a mapping of option names (`batch_size` or `batch-size`, or the flag's name
where it differs: `from` for `did adapt --from`) to values, the way
they would be typed, but with YAML/JSON types: `steps: 2000`, `block_sizes: [4, L]` (or
`"4,L"`), `resample: false`. A file may also hold one section per command (`train:`,
`finetune-mixscale:`, `draft:` ...); a command then reads its own section. Flags given on the
command line override the file. A run folder's config.json (or the folder itself) is a config
file too: it holds the resolved options of the run (`options`), so `--config RUN` repeats it.

Unknown keys and values of the wrong type are one-line usage errors that name the key (exit 2).
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from did_cli.commands.options import Opt, explicit
from did_cli.commands.registry import COMMANDS
from did_cli.errors import UsageError

RUN_CONFIG = "config.json"

CONFIG_HELP = (
    "YAML or JSON file of options (keys are option names, e.g. batch_size: 16; one section per command "
    "allowed); flags given here override it. A run folder (its config.json) repeats that run. See "
    "docs/config.md."
)


def cli_name(name: str) -> str:
    """'finetune_mixscale' -> 'finetune-mixscale'."""
    return name.replace("_", "-")


def read_file(path: str | Path) -> dict[str, Any]:
    """The mapping a config file holds (a run folder: its config.json). The file is read within
    a size limit, YAML aliases within an expansion limit (did_cli.io.bounded)."""
    from did_cli.io.bounded import SMALL_FILE, load_yaml, read_bytes, text_of

    p = Path(path)
    where = f"--config {path}"
    if p.is_dir():
        if not (p / RUN_CONFIG).is_file():
            raise UsageError(f"{where}: a folder without {RUN_CONFIG} (give a config file, or a run folder)")
        p = p / RUN_CONFIG
    if not p.exists() and str(path) != "-":
        raise UsageError(f"{where}: no such file")
    text = text_of(read_bytes(p, where, SMALL_FILE, UsageError, "a config file"), where, UsageError)
    json_file = p.suffix.lower() == ".json"
    try:
        if json_file:
            from did_cli.io.jsonl import decode

            data = decode(text, f"{where}: ", "a config file")
        else:  # YAML is a superset of JSON: other suffixes parse either
            data = load_yaml(text, where, UsageError)
    except UsageError:
        raise
    except Exception as e:  # DidError of the JSON decoder, yaml.YAMLError: one line with the position
        msg = " ".join(str(e).removeprefix(f"{where}: ").split())
        raise UsageError(f"{where}: not valid {'JSON' if json_file else 'YAML'} ({msg})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}"
        )
    return data


def section(data: dict[str, Any], command: str, path: str | Path) -> dict[str, Any]:
    """The options of `command` in a file: a run's saved options, its section, or the whole file."""
    if isinstance(data.get("options"), dict) and "values" in data["options"]:  # a run folder's config.json
        saved = data["options"]
        if saved.get("command") not in (None, command):
            raise UsageError(
                f"--config {path}: holds the options of did {saved['command']}, not did {command}"
            )
        return dict(saved["values"])
    if "train" in data and "model" in data and isinstance(data["train"], dict):
        raise UsageError(
            f"--config {path}: a run config without saved options (written by an older did); "
            "write a config file with the options instead"
        )
    sections = [k for k in data if str(k).replace("_", "-") in COMMANDS and isinstance(data[k], dict)]
    if not sections:
        return dict(data)
    plain = [k for k in data if k not in sections]
    if plain:
        raise UsageError(
            f"--config {path}: key {plain[0]!r} is outside the command sections ({', '.join(sections)})"
        )
    mine = [k for k in sections if str(k).replace("_", "-") == command]
    if not mine:
        raise UsageError(
            f"--config {path}: no section for did {command} (it has {', '.join(map(str, sections))})"
        )
    return dict(data[mine[0]])


def _flag(opt: Opt) -> str:
    return opt.flags[0].split("/")[0] if opt.flags else "--" + opt.name.replace("_", "-")


def convert(opt: Opt, value: Any, key: str, path: str | Path) -> Any:
    """A file's value as the command line would have given it; a wrong type is a UsageError."""
    typ, default, _ = opt.resolve()
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    optional = type(None) in typing.get_args(typ)
    base = args[0] if optional and len(args) == 1 else typ
    where = f"--config {path}: key {key!r}"
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where} may not be null")
    if typing.get_origin(base) is list:  # repeatable options and arguments: a list of texts
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise UsageError(f"{where} must be a text or a list of texts, got {value!r}")
        return [str(v) for v in items]
    if base is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where} must be an integer, got {value!r}")
        if abs(value) >= 2**63:  # no option counts that far; beyond it torch and numpy overflow
            raise UsageError(f"{where} ({_flag(opt)}): {str(value)[:20]}... is too large")
        out: Any = value
    elif base is float:
        out = _number(value, where)
    elif isinstance(value, list):  # list-valued settings typed as text: [4, L] -> "4,L"
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise UsageError(f"{where} must be a list of numbers or texts, got {value!r}")
        out = ",".join(map(str, value))
    elif isinstance(value, (dict, bool)):
        raise UsageError(
            f"{where} must be a {'text' if base in (str, Path) else getattr(base, '__name__', 'value')}, "
            f"got {value!r}"
        )
    else:
        out = str(value)
    if base is Path:
        out = Path(out)
    low = opt.kw.get("min")
    if low is not None and isinstance(out, (int, float)) and out < low:
        raise UsageError(f"{where} ({_flag(opt)}) {out}: must be >= {low}")
    return out


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{where} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise UsageError(f"{where} must be a number, got {value!r}")


def file_values(path: str | Path, command: str, options: list[Opt]) -> dict[str, Any]:
    """The options a file sets for `command`, checked and converted."""
    by_name = {o.name: o for o in options}
    # an option whose flag is not its name (`did adapt --from` fills `source`) takes either key
    by_flag = {
        f.split("/")[0][2:].replace("-", "_"): o.name for o in options for f in o.flags if f.startswith("--")
    }
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in section(read_file(path), command, path).items():
        name = str(key).replace("-", "_")
        name = name if name in by_name else by_flag.get(name, name)
        if name in spelled:
            raise UsageError(
                f"--config {path}: keys {spelled[name]!r} and {str(key)!r} name the same option; keep one"
            )
        spelled[name] = str(key)
        if name == "config":
            raise UsageError(f"--config {path}: key 'config': a config file cannot name another one")
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise UsageError(f"--config {path}: unknown key {key!r} for did {command}{hint}")
        out[name] = convert(by_name[name], value, str(key), path)
    return out


def apply(
    values: dict[str, Any],
    options: list[Opt],
    command: str,
    implicit: Callable[[dict[str, Any]], Path | None] | None = None,
    given: Callable[[str], bool] = explicit,
) -> dict[str, Any]:
    """`values` with every option not given on the command line taken from --config (then from
    the file `implicit(values)` names, e.g. the run being resumed); then the required ones checked."""
    command = cli_name(command)
    path = values.pop("config", None)
    on_line = given
    given = {o.name for o in options if on_line(o.name)}
    layers = []
    if path is not None:
        layers.append(file_values(path, command, options))
    if implicit is not None:
        merged = dict(values, **(layers[0] if layers else {}))
        extra = implicit(merged)
        if extra is not None and _has_saved_options(extra):
            layers.append(file_values(extra, command, options))
    for layer in layers:
        for name, value in layer.items():
            if name not in given:
                values[name] = value
                given.add(name)
    for o in options:
        if o.resolve()[1] is ... and values.get(o.name) is None:
            what = "argument " + o.name.upper() if o.argument else "option " + _flag(o)
            raise UsageError(
                f"missing {what} (give it on the command line or in --config; see 'did {command} --help')"
            )
    return values


def _has_saved_options(path: Path) -> bool:
    """Whether a run's config.json holds saved options (runs of older versions, or built in
    Python, do not; the trainer then checks the flags against the run as before)."""
    try:
        return path.is_file() and isinstance(read_file(path).get("options"), dict)
    except UsageError:  # unreadable: the trainer reports it in its own words
        return False


def record(command: str, values: dict[str, Any]) -> dict[str, Any]:
    """The resolved options of a run as saved in its config.json (itself a valid --config)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {"command": cli_name(command), "values": {k: plain(v) for k, v in values.items() if k != "config"}}


__all__ = ["CONFIG_HELP", "apply", "record", "read_file", "file_values", "convert", "section", "cli_name"]
