"""The shape of the code, measured from its source: no import circle (imports inside functions
count too), no long function, and textinv modules imported only at the top of a module.

`python tests/test_architecture.py` prints the figures."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "textinv"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.AST, name: str, path: Path, known: set[str]) -> list[str]:
    """The package's modules an import statement names (``from . import x`` names module ``x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return sorted({t for t in targets if t in known and t != name})


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Every import of one package module by another, wherever it stands; and the ones inside a
    function (module, line, imported module)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    inner = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                inner += [(name, node.lineno, t) for t in _imported(node, name, path, set(known))]
        for node in ast.walk(tree):
            edges[name].update(_imported(node, name, path, set(known)))
    return edges, sorted(set(inner))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return found


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str, str]]:
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((lines, name, node.name))
    return sorted(found, reverse=True)


def test_no_import_circle_counting_imports_inside_functions():
    edges, _ = import_graph()
    assert circles(edges) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_textinv_modules_are_imported_at_the_top_of_a_module():
    _, inner = import_graph()
    assert inner == []


def test_no_function_is_longer_than_60_lines():
    assert long_functions() == []


if __name__ == "__main__":
    edges, inner = import_graph()
    print(f"import circles: {circles(edges) or 'none'}")
    print(f"textinv modules imported inside functions: {len(inner)}")
    print(f"functions over {MAX_FUNCTION_LINES} lines: {long_functions() or 'none'}")
    sys.exit(0)
