"""The folder tree is the architecture: these tests read the source (ast, nothing imported).

- no import cycle among the modules of ``kdstore/``, ``trainers/`` and ``cli.py``, counting
  every import statement, inside functions and ``if TYPE_CHECKING:`` blocks too;
- ``kdstore/`` imports no torch and nothing from ``trainers/``;
- no function outside a Triton kernel is longer than ``MAX_FUNCTION_LINES``.

``python tests/test_architecture.py`` prints the import cycles and the longest functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdstore", "trainers")
# The house style: no function outside a Triton kernel longer than this (lines from ``def`` to
# its last line, decorators excluded).
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    """Module name -> file, for the packages and cli.py."""
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))] + [ROOT / "cli.py"]
    return {_module_name(p): p for p in files}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (``from ..config import x`` in trainers.student.distill)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module an import statement of the file names: project modules, resolved to the
    deepest one that exists (``from kdstore import store`` -> kdstore.store), else the top name
    (torch, numpy)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            out.add(name)
    return out - {module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = sources()
    known = set(files)
    return {m: imports_of(m, p, known) & known for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _is_triton_kernel(node: ast.AST) -> bool:
    return any("triton" in ast.unparse(d) for d in getattr(node, "decorator_list", ()))


def function_lengths() -> list[tuple[int, str]]:
    """(lines, ``file:line name``) of every function and method, longest first; nested
    functions count in their parent and on their own."""
    out = []
    for path in sources().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, key=lambda x: (-x[0], x[1]))


def test_the_walker_resolves_imports(tmp_path):
    """A cycle through a relative, a function-level and a TYPE_CHECKING import is found;
    imports of outside packages are kept by their top name."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import numpy.linalg\nfrom .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = {m: imports_of(m, pkg / (m.split(".")[-1] + ".py" if "." in m else "__init__.py"), known) for m in known}
    assert graph["pkg.a"] == {"numpy", "pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"typing", "pkg.a"}
    assert cycles({m: g & known for m, g in graph.items()}) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_store_imports_no_torch_and_no_trainer():
    files = sources()
    known = set(files)
    bad = {m: sorted(n for n in imports_of(m, p, known) if n.split(".")[0] in ("torch", "trainers", "cli", "triton"))
           for m, p in files.items() if m.split(".")[0] == "kdstore"}
    assert {m: n for m, n in bad.items() if n} == {}


def test_no_function_longer_than_the_limit():
    lengths = function_lengths()
    assert lengths, "no function found: the walker reads nothing"
    assert [f"{n} lines: {where}" for n, where in lengths if n > MAX_FUNCTION_LINES] == []


if __name__ == "__main__":
    for comp in cycles(import_graph()):
        print("cycle:", " <-> ".join(comp))
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    for n, where in function_lengths():
        if n > limit:
            print(f"{n:4d} {where}")
