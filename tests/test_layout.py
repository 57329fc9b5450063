"""The package's module graph: no import circles (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tapir_ray"


def _imports() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tapir_ray"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_itself_through_another():
    graph = _imports()
    assert "tapir_ray.rounds" in graph and "tapir_ray.citing_run" in graph["tapir_ray.launch"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles(graph) == []


def test_the_two_recipes_stand_side_by_side_on_the_run_layer():
    """TAPIR and CITING are siblings over recipe.py: neither imports the other, the run layer
    imports neither, and the evaluation harness reads a run through the run layer."""
    graph = _imports()
    recipes = {"tapir_ray.rounds", "tapir_ray.citing_run"}
    for module in (*recipes, "tapir_ray.recipe", "tapir_ray.eval.harness"):
        assert not graph[module] & recipes, (module, graph[module] & recipes)
    assert all("tapir_ray.recipe" in graph[r] for r in recipes)
    assert "tapir_ray.recipe" in graph["tapir_ray.eval.harness"]
