"""The package's import graph (module-level and function-local imports of landmarks.* modules,
read with ast from every file under src/landmarks/, sub-packages included) has no cycle: every strongly connected component is a
single module."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "landmarks"


def module_names(pkg: Path = PKG) -> dict[str, Path]:
    """Dotted name (below `landmarks`) -> file, for every module of the package, sub-packages included."""
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = list(p.relative_to(pkg).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = p
    return out


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """module name -> the landmarks modules it imports anywhere in its source (module level or
    inside functions; `from landmarks.x import y` counts as importing landmarks.x.y when y is a module)."""
    files = module_names(pkg)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y / from . import x
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                    base = ".".join(["landmarks", *[u for u in up if u]] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import sub` depends on the module pkg.sub; `from pkg import name` on pkg itself
                targets = [f"{base}.{a.name}" for a in node.names]
                if not any(t.removeprefix("landmarks.") in files for t in targets):
                    targets.append(base)
            for t in targets:
                parts = t.split(".")
                if parts[0] != "landmarks":
                    continue
                name = ".".join(parts[1:])
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != m:
                    graph[m].add(name)
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
