"""The package's import graph (module-level and function-local imports of landmarks.* modules,
read with ast from src/landmarks/*.py) has no cycle: every strongly connected component is a
single module."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "landmarks"


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """module name -> the landmarks modules it imports anywhere in its source (module level or
    inside functions; `from landmarks import x` counts as importing landmarks.x when x is a module)."""
    modules = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        tree = ast.parse((pkg / f"{m}.py").read_text(), filename=f"{m}.py")
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y / from . import x
                    base = "landmarks" + (f".{node.module}" if node.module else "")
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                parts = t.split(".")
                if parts[0] == "landmarks" and len(parts) > 1 and parts[1] in modules and parts[1] != m:
                    graph[m].add(parts[1])
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components in sorted order, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return sorted(out)


def test_graph_reader_and_cycle_finder():
    g = import_graph()
    assert "cli" in g and "config" in g["cli"]  # the reader sees the package's real imports
    assert strongly_connected({"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"d"}}) == [["a", "b"], ["c"], ["d"]]


def test_no_import_cycles():
    g = import_graph()
    cycles = [c for c in strongly_connected(g) if len(c) > 1]
    detail = "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} imports {b}" for a in c for b in sorted(g[a] & set(c))) + ")"
        for c in cycles
    )
    assert not cycles, f"import cycle(s) in landmarks: {detail}; move the shared code into a module both can import"
