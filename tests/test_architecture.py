"""The shape of the code: no import circles in florist/ or bench/, imports inside functions
included, and one round engine that every driver calls (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, base: Path, prefix: str) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts] if prefix else parts)


def import_graph(base: Path, prefix: str, known: set[str]) -> dict[str, set[str]]:
    """module -> the modules of ``known`` it imports anywhere in its body (functions too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(base.rglob("*.py")):
        name = module_name(path, base, prefix)
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the module pkg.sub when there is one
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names
                ]
            edges.update(t for t in targets if t in known and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def known_modules(base: Path, prefix: str) -> set[str]:
    return {module_name(p, base, prefix) for p in base.rglob("*.py")}


def test_no_import_circles_in_florist() -> None:
    known = known_modules(ROOT / "florist", "florist")
    graph = import_graph(ROOT / "florist", "florist", known)
    assert "florist.rounds" in graph["florist.federation"]  # the graph sees real imports
    assert cycles(graph) == []


def test_no_import_circles_in_bench() -> None:
    known = known_modules(ROOT / "bench", "")
    graph = import_graph(ROOT / "bench", "", known)
    assert "common" in graph["results"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_a_function_body(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("def g():\n    import a\n")
    known = known_modules(tmp_path, "")
    assert cycles(import_graph(tmp_path, "", known)) == [["a", "b", "c"]]


def test_every_driver_calls_the_round_engine() -> None:
    """The run, the sweep, Flower's strategy and ClientApp, and SecAgg+ share florist.rounds, and
    none of them calls the trainer or an aggregator's aggregate itself."""
    known = known_modules(ROOT / "florist", "florist")
    graph = import_graph(ROOT / "florist", "florist", known)
    drivers = ["florist.federation", "florist.sweep", "florist.flower.strategy", "florist.flower.client_app"]
    for driver in drivers:
        assert "florist.rounds" in graph[driver], driver
    for driver in [*drivers, "florist.flower.secagg"]:
        source = (ROOT / (driver.replace(".", "/") + ".py")).read_text()
        assert ".train(" not in source.replace("@app.train(", ""), driver
        assert "aggregator.aggregate(" not in source, driver
