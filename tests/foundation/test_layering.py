"""The import graph of cronium_fab points one way: no cycles, and the library never imports the
program (``cli``) or its entry point (``launch``). Imports inside functions count too: a lazy
import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cronium_fab"
PROGRAM = {"cronium_fab.cli", "cronium_fab.launch", "cronium_fab.__main__"}
# The standard-library floor the entry point stands on before it imports anything heavy.
FLOOR = {"cronium_fab", "cronium_fab.errors", "cronium_fab.paths", "cronium_fab.signals", "cronium_fab.wire"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The cronium_fab modules that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cronium_fab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cronium_fab":
                continue
            for alias in node.names:   # `from . import paths` imports the module cronium_fab.paths
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_library_never_imports_the_program() -> None:
    g = graph()
    wrong = {m: sorted(g[m] & PROGRAM) for m in g if m not in PROGRAM and g[m] & PROGRAM}
    assert wrong == {}, f"library modules import the program: {wrong}"


def test_entry_point_floor_is_standard_library_only() -> None:
    """launch and its floor import nothing of ours beyond the floor (cli only inside main())."""
    g = graph()
    for name in FLOOR | {"cronium_fab.launch"}:
        assert g[name] - FLOOR - {"cronium_fab.cli"} == set(), name
        tree = ast.parse(modules()[name].read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        third_party = [a.name for n in top if isinstance(n, ast.Import) for a in n.names
                       if a.name.split(".")[0] not in _stdlib()]
        third_party += [n.module for n in top if isinstance(n, ast.ImportFrom) and not n.level
                        and n.module and n.module.split(".")[0] not in _stdlib()]
        assert third_party == [], f"{name} imports {third_party} at module level"


def test_the_checker_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _stdlib() -> set[str]:
    import sys

    return set(sys.stdlib_module_names) | {"__future__"}


def test_product_never_imports_the_testing_wing() -> None:
    g = graph()
    wrong = {m: sorted(d) for m in g if not m.startswith("cronium_fab.testing")
             for d in [{x for x in g[m] if x.startswith("cronium_fab.testing")}] if d}
    assert wrong == {}, f"product modules import cronium_fab.testing: {wrong}"
