"""The package's shape: no import cycles between its modules, and no module too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
PACKAGE = "streamhold"

# The goal is 500 lines a module, a length one can hold in mind; 600 is the line today, with room for
# modules that grow a little before they split.
MAX_LINES = 600
# Modules still over the line, at most as long as they are now; each leaves this list when it splits.
LONG_FOR_NOW = {
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(APP).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(APP.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package `name` imports, at the top, inside functions or under TYPE_CHECKING."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                # A package's own __init__ is its level-1 anchor; a plain module's is its parent.
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            # `from . import x` and `from .pkg import mod` name modules; otherwise the stem is the module.
            named = [f"{stem}.{alias.name}" for alias in node.names]
            targets = [target for target in named if target in known] or [stem]
        else:
            continue
        for target in targets:
            # `import streamhold.a.b` also runs the packages above it; count the nearest known one.
            while target and target not in known:
                target = target.rpartition(".")[0]
            # Importing a module first runs its packages' __init__ files: a heavy __init__ can close a cycle.
            while target and target != PACKAGE:
                if target != name:
                    found.add(target)
                target = target.rpartition(".")[0]
    # A module's own packages are already running when it is imported: those edges are no cycle.
    return {target for target in found if not name.startswith(target + ".")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


# Layering runs one way: surfaces -> sdk / store -> live -> models. What each lower layer must never reach,
# directly or through the modules it imports.
SURFACES = ("protocol", "web", "http", "sdk", "agentuity_api", "cli")
NEVER_REACHED = {
    "models": ("store", *SURFACES),
    "live": ("store", *SURFACES),
    "store": SURFACES,
}


def _within(module: str, part: str) -> bool:
    full = f"{PACKAGE}.{part}"
    return module == full or module.startswith(full + ".")


def _reached(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` imports, directly or not, each with the chain of imports that gets there."""
    chains: dict[str, list[str]] = {start: [start]}
    pending = [start]
    while pending:
        node = pending.pop()
        for child in sorted(graph[node]):
            if child not in chains:
                chains[child] = [*chains[node], child]
                pending.append(child)
    del chains[start]
    return chains


def test_the_graph_sees_the_layers_it_checks() -> None:
    graph = _graph()
    for part in (*NEVER_REACHED, *SURFACES):
        assert any(_within(module, part) for module in graph), f"no module {PACKAGE}.{part}"


def test_lower_layers_import_nothing_from_the_layers_above() -> None:
    graph = _graph()
    wrong = [
        " -> ".join(chain)
        for lower, above in NEVER_REACHED.items()
        for module in sorted(graph)
        if _within(module, lower)
        for target, chain in _reached(graph, module).items()
        if any(_within(target, part) for part in above)
    ]
    rule = "surfaces -> sdk / store -> live -> models"
    assert not wrong, f"imports against the layering ({rule}):\n" + "\n".join(wrong)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "; ".join(edges)


def test_the_graph_sees_relative_and_type_checking_imports() -> None:
    graph = _graph()
    # The package's face names its modules only under TYPE_CHECKING (and loads them on first use).
    assert {"streamhold.settings", "streamhold.errors"} <= graph[PACKAGE]


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (move the shared piece down a layer):\n" + "\n".join(
        _describe(component, graph) for component in cycles
    )


def test_no_module_over_the_line_limit() -> None:
    lengths = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    long = {
        name: count for name, count in lengths.items() if count > LONG_FOR_NOW.get(name, MAX_LINES)
    }
    assert not long, f"modules over {MAX_LINES} lines (split them along their concerns): {long}"
    split = sorted(name for name in LONG_FOR_NOW if lengths.get(name, 0) <= MAX_LINES)
    assert not split, f"these are {MAX_LINES} lines or fewer now; take them off LONG_FOR_NOW: {split}"
