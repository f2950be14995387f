"""Import cycles among slimkit's modules (`python tools/import_cycles.py [--all] [--packages]`).

Edges are the modules a module names in its imports: `from slimkit.a import b` points at
`slimkit.a.b` when that is a module, else at `slimkit.a`. By default only imports that run when
the module loads count (top level); `--all` adds imports inside functions, which defer a cycle
but do not remove it; `--packages` finds cycles between sub-packages instead of modules. Exit
status 1 when a cycle is found.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        out = []
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            out.append(full if full in modules else node.module)
        return [m for m in out if m in modules]
    return []


def _top_level(tree: ast.Module):
    """Statements that run at import: the module body, and the bodies of its if/try blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]
        yield node


def import_graph(include_deferred: bool = False) -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if include_deferred else _top_level(tree)
        graph[name] = {t for n in nodes for t in _targets(n, modules) if t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same edges between slimkit's sub-packages (a top-level module counts as its own)."""
    def package(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    out: dict[str, set[str]] = {}
    for source, targets in graph.items():
        out.setdefault(package(source), set()).update(package(t) for t in targets if package(t) != package(source))
    return out


if __name__ == "__main__":
    graph = import_graph("--all" in sys.argv)
    found = cycles(package_graph(graph) if "--packages" in sys.argv else graph)
    for component in found:
        print(f"cycle of {len(component)}: {' <-> '.join(component)}")
    print(f"{len(found)} import cycle(s)")
    sys.exit(1 if found else 0)
