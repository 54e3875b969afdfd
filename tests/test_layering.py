"""The package's imports run one way (docs/architecture.md): no cycle between modules or packages, and the
foundation imports nothing above it. Every import counts, inside functions and under TYPE_CHECKING too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "optimum_prune"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                parent = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                parent = parent if node.level else (node.module or "")
                targets = [f"{parent}.{alias.name}" for alias in node.names] + [parent]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    graph[name].add(target)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph()
    assert "optimum_prune.engine.blockwise" in graph["optimum_prune.pruner"]  # the graph sees relative imports
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles(graph) == []
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            if package_of(target) != package_of(module):
                packages.setdefault(package_of(module), set()).add(package_of(target))
    assert cycles(packages) == []


def test_the_foundation_imports_nothing_above_it():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("optimum_prune.core"):
            above = {target for target in targets if not target.startswith("optimum_prune.core")}
            assert not above, (module, above)
    settings = graph["optimum_prune.method_settings"]
    assert settings <= {"optimum_prune.core.masks"}, settings  # the CLI imports it at start-up


def test_method_names_are_spelled_only_in_methods():
    from optimum_prune.methods import METHODS

    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts or path.name == "config.py":  # config: the default
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        spelled = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)} & set(METHODS)
        assert not spelled, (path, spelled)
