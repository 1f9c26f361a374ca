"""The package's shape (docs/design.md): modules a newcomer reads in one sitting, functions of
one screen, modules that share only public names, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "did_cli"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(f.read_text(), filename=str(f))
    return out


def _source_lines(name: str) -> int:
    path = PKG.parent / (name.replace(".", "/") + ".py")
    if not path.exists():
        path = PKG.parent / name.replace(".", "/") / "__init__.py"
    return len(path.read_text().splitlines())


def _imports(tree: ast.Module, name: str, top_level_only: bool):
    """(imported module, imported names) of a module; relative imports are not used here."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_modules_and_functions_are_short():
    mods = _modules()
    long_modules = {m: n for m in mods if (n := _source_lines(m)) > MAX_MODULE_LINES}
    assert not long_modules, long_modules
    long_functions = []
    for m, tree in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{m}.{node.name}: {n} lines")
    assert not long_functions, long_functions


def test_no_private_name_is_imported_across_modules():
    bad = []
    for m, tree in _modules().items():
        for mod, names in _imports(tree, m, top_level_only=False):
            if mod.startswith("did_cli") and mod != m:
                bad += [
                    f"{m} imports {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")
                ]
    assert not bad, bad


def test_no_import_cycle_at_any_level():
    """Function-level imports count too: a cycle through a lazy import is still a knot a reader
    must untie, and the import that closes it fails as soon as the order changes."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, tree in mods.items():
        for mod, names in _imports(tree, m, top_level_only=False):
            if mod in mods:
                graph[m].add(mod)
            for n in names:  # `from did_cli import checkpoint` imports a module
                if f"{mod}.{n}" in mods:
                    graph[m].add(f"{mod}.{n}")
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if d == m or m.startswith(d + "."):
                continue  # `from did_cli import api` inside did_cli; a module importing its own package
            assert state.get(d) != 1, " -> ".join(path[path.index(d) :] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # the check itself sees real edges, lazy ones included
    assert "did_cli.core.model_config" in graph["did_cli.core.dit"]
    assert "did_cli.io.checkpoint" in graph["did_cli.commands.sample"]


def test_help_texts_are_the_field_docstrings():
    """--help texts come from did_cli/commands/help_texts.py, written from the docstrings under
    the settings dataclasses' fields; a docstring edited without rewriting it fails here."""
    import field_help

    stored = field_help.TARGET.read_text()
    assert stored == field_help.render(field_help.collect()), "run: python tests/field_help.py"
