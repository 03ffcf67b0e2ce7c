"""The shape of the code, measured from its source: no import circle (imports inside functions
count too), no long function, textinv modules imported only at the top of a module, and inside a
function only the imports that must wait there: a heavy optional dependency or a platform-only
module, each saying why on its line.

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


# What a function may import itself: the heavy optional dependencies (the extras 'ui': gradio,
# pandas; 'eval': matplotlib; 'samplers': scipy, torchsde; the browser test's playwright) and
# platform-only modules (fcntl: not on Windows).  Everything else is imported at the top.
DEFERRABLE = {"gradio", "pandas", "matplotlib", "scipy", "torchsde", "playwright", "fcntl"}
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _top_level_packages(path: Path) -> set[str]:
    """The packages a module imports outside its functions (first name: ``matplotlib.pyplot`` → ``matplotlib``)."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, FUNCTIONS) for n in ast.walk(f)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add((node.module or "").split(".")[0])
    return found


def _deferrable(node: ast.Import | ast.ImportFrom, name: str, path: Path, known: dict[str, Path]) -> bool:
    """An optional or platform-only package, or a module of the package that imports one at its top
    (importing it would import the optional dependency)."""
    own = _imported(node, name, path, set(known))
    if own:
        return all(_top_level_packages(known[m]) & DEFERRABLE for m in own)
    if isinstance(node, ast.Import):
        return all(a.name.split(".")[0] in DEFERRABLE for a in node.names)
    return not node.level and (node.module or "").split(".")[0] in DEFERRABLE


def misplaced_imports(known: dict[str, Path] | None = None) -> list[tuple[str, int, str]]:
    """Imports inside functions that should be at the top of their module, or that may wait but do
    not say why with a ``# deferred:`` comment on their line: (module, line, what is wrong)."""
    known = known or modules()
    found = []
    for name, path in known.items():
        source = path.read_text()
        lines = source.splitlines()
        for func in (n for n in ast.walk(ast.parse(source)) if isinstance(n, FUNCTIONS)):
            for node in (n for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))):
                if not _deferrable(node, name, path, known):
                    found.append((name, node.lineno, "not an optional or platform-only module: import it at the top"))
                elif "# deferred:" not in lines[node.lineno - 1]:
                    found.append((name, node.lineno, "no '# deferred:' reason on its line"))
    return sorted(set(found))


def test_no_import_circle_counting_imports_inside_functions():
    edges, _ = import_graph()
    assert circles(edges) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_textinv_modules_are_imported_at_the_top_of_a_module():
    _, inner = import_graph()
    assert inner == []


def test_functions_import_only_deferred_optional_or_platform_modules_and_say_why():
    assert misplaced_imports() == []


def test_the_import_checker_finds_what_belongs_at_the_top_and_a_missing_reason(tmp_path):
    (tmp_path / "heavy.py").write_text("import gradio\n")
    (tmp_path / "light.py").write_text("import json\n\n\ndef f():\n    import pandas  # deferred: the ui extra\n")
    (tmp_path / "mod.py").write_text(
        "def f():\n"
        "    import json\n"
        "    import gradio as gr\n"
        "    import matplotlib.pyplot as plt  # deferred: the eval extra\n"
        "    from .heavy import x  # deferred: imports gradio\n"
        "    from .light import y  # deferred: says so, but imports nothing optional at its top\n"
        "    try:\n"
        "        import fcntl  # deferred: not on Windows\n"
        "    except ImportError:\n"
        "        from pathlib import Path\n")
    known = {f"pkg.{m}": tmp_path / f"{m}.py" for m in ("heavy", "light", "mod")}
    assert [(m, line) for m, line, _ in misplaced_imports(known)] == [("pkg.mod", 2), ("pkg.mod", 3), ("pkg.mod", 6),
                                                                       ("pkg.mod", 10)]
    assert "reason" in misplaced_imports(known)[1][2] and "at the top" in misplaced_imports(known)[0][2]


def test_no_function_is_longer_than_60_lines():
    assert long_functions() == []


if __name__ == "__main__":
    edges, inner = import_graph()
    print(f"import circles: {circles(edges) or 'none'}")
    print(f"textinv modules imported inside functions: {len(inner)}")
    print(f"imports inside functions that belong at the top or say no reason: {len(misplaced_imports())}")
    print(f"functions over {MAX_FUNCTION_LINES} lines: {long_functions() or 'none'}")
    sys.exit(0)
