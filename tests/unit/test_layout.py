"""The tree keeps its architecture: parts import only downward, no import circles, small modules.

Read from the source with :mod:`ast` (every ``import``, at module level or inside a
function, ``TYPE_CHECKING`` blocks included), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What each part may import of ours (besides itself). "root" is pipeline/errors.py,
# settings.py and config_file.py, which everything may use.
ALLOWED: dict[str, set[str]] = {
    "root": set(),
    "wire": {"root"},
    "shim": {"root", "wire"},
    "core": {"root", "wire"},
    "sink": {"root", "wire", "core"},
    "export": {"root", "wire", "core"},
    "dev": {"root"},
    "agents": {"root", "wire", "core", "sink", "export"},
    "cli": {"root", "wire", "shim", "core", "sink", "export", "dev", "agents", "package"},
    "package": {"root", "wire", "shim"},  # pipeline/__init__.py: the public API
}
ROOT_MODULES = {"pipeline.errors", "pipeline.settings", "pipeline.config_file"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("pipeline", "agents"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _part(module: str) -> str | None:
    """The part a module of ours belongs to; None for third-party modules."""
    names = module.split(".")
    if names[0] == "agents":
        return "agents"
    if names[0] == "bench":
        return "bench"
    if names[0] != "pipeline":
        return None
    if module == "pipeline":
        return "package"
    if module in ROOT_MODULES:
        return "root"
    return names[1]


def _imports(path: Path, module: str) -> set[str]:
    """Every module of ours that ``path`` imports (``from a import b`` may name a module)."""
    known = _modules()
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if f"{base}.{alias.name}" in known)
    return {m for m in found if _part(m) is not None and m != module}


def test_parts_import_only_downward() -> None:
    wrong = []
    for module, path in _modules().items():
        part = _part(module)
        assert part is not None
        for imported in sorted(_imports(path, module)):
            other = _part(imported)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} ({part}) imports {imported} ({other})")
    assert wrong == []


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {m: {i for i in _imports(p, m) if i in modules} for m, p in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a circle of code.
    for m in graph:
        graph[m] = {i for i in graph[m] if not (modules[m].name == "__init__.py"
                                                and i.startswith(m + "."))}
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert cycles == []


def test_modules_are_readable_in_one_sitting() -> None:
    long = {m: n for m, p in _modules().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_at_most_four_modules_at_the_package_root() -> None:
    direct = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert direct == ["__init__.py", "config_file.py", "errors.py", "settings.py"]


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The import reader finds imports inside functions and TYPE_CHECKING blocks."""
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from pipeline.sink.writer import Sink\n"
                    "def f():\n    import pipeline.cli.main\n"
                    "    from pipeline.core import rollups\n")
    assert _imports(path, "pipeline.wire.x") == {
        "pipeline.sink.writer", "pipeline.cli.main", "pipeline.core", "pipeline.core.rollups"}
