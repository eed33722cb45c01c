"""The package's modules import each other without cycles (issue 12 §1).

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``.
A function-level or type-only import hides a cycle from Python, not from a reader: the
two modules still cannot be understood, tested or moved one without the other.

Importing ``pkg.mod`` runs ``pkg/__init__.py`` first; that implicit edge is not counted
(a package re-exporting its own modules is not a cycle), but ``from pkg import name``
written in a submodule is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trio_bridge

Graph = dict[str, set[str]]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(
    name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: set[str]
) -> set[str]:
    """The package's modules one import statement runs: ``from pkg import mod`` imports
    the module ``pkg.mod``, ``from mod import name`` the module ``mod``."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = package[: len(package) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    named = {f"{module}.{alias.name}" for alias in node.names}
    found = named & modules
    if len(found) < len(named):  # some names are attributes of the module itself
        found.add(module)
    return found & modules


def import_graph(root: Path) -> Graph:
    """Module -> the package's modules it imports anywhere in its source."""
    paths = {module_name(root, path): path for path in root.rglob("*.py")}
    graph: Graph = {}
    for name, path in paths.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets |= imported_modules(name, path, node, set(paths))
        graph[name] = targets - {name}
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_cycle() -> None:
    root = Path(trio_bridge.__file__).parent
    graph = import_graph(root)
    assert len(graph) > 40  # the whole package was read
    assert cycles(graph) == []


def test_a_cycle_through_a_function_or_type_checking_import_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
    )
    (package / "b.py").write_text("def f():\n    from .sub.c import C\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import a\n")
    (package / "d.py").write_text("from .sub import c\nfrom . import a\n")
    (package / "e.py").write_text("from . import d, VERSION\n")  # d and the package
    graph = import_graph(package)
    assert graph["pkg.e"] == {"pkg", "pkg.d"}
    assert graph["pkg.d"] == {"pkg.a", "pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
