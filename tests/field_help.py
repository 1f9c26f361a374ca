"""The --help texts of options come from the docstrings under dataclass fields. Python does not
keep those at run time, so they are collected from the source here and stored in
did_cli/commands/help_texts.py, which the CLI reads; tests/test_layout.py checks it is current.

    python tests/field_help.py      # rewrite did_cli/commands/help_texts.py after editing a docstring
"""

from __future__ import annotations

import ast
import pprint
import re
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "did_cli"
TARGET = PKG / "commands" / "help_texts.py"
HEADER = '''"""Field docstrings of the settings dataclasses, by "module.Class" and field: the --help texts
of the options declared from those fields (did_cli/commands/options.py). Written by
`python tests/field_help.py` from the source; do not edit by hand."""

# fmt: off
'''


def _is_dataclass(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
            isinstance(target, ast.Attribute) and target.attr == "dataclass"
        ):
            return True
    return False


def _named_in_commands() -> set[str]:
    """Class names the command modules mention: the dataclasses options are declared from."""
    text = "\n".join(f.read_text() for f in (PKG / "commands").glob("*.py") if f != TARGET)
    return set(re.findall(r"\b([A-Z]\w*Config)\b", text))


def collect() -> dict[str, dict[str, str]]:
    """{"did_cli.x.y.Class": {field: docstring with whitespace collapsed}} for every settings
    dataclass the commands declare options from (and its bases)."""
    wanted = _named_in_commands()
    out: dict[str, dict[str, str]] = {}
    for f in sorted(PKG.rglob("*.py")):
        if f == TARGET:
            continue
        module = ".".join(f.relative_to(PKG.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.ClassDef) and _is_dataclass(node) and node.name in wanted):
                continue
            docs = {}
            for a, b in zip(node.body, node.body[1:]):
                if (
                    isinstance(a, ast.AnnAssign)
                    and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)
                ):
                    docs[a.target.id] = " ".join(b.value.value.split())
            if docs:
                out[f"{module}.{node.name}"] = docs
    return out


def render(docs: dict[str, dict[str, str]]) -> str:
    return HEADER + "HELP_TEXTS = (\n" + pprint.pformat(docs, width=108, sort_dicts=True) + "\n)\n"


if __name__ == "__main__":
    TARGET.write_text(render(collect()))
    sys.stderr.write(f"wrote {TARGET}\n")
