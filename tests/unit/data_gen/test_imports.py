"""data_gen/ imports its own modules at module level only, and they form no cycle.

Imports under ``if TYPE_CHECKING:`` are for annotations and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import data_gen

PACKAGE = Path(data_gen.__file__).parent
MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}


def _targets(node: ast.AST) -> set[str]:
    """The data_gen modules that ``node`` imports (empty if it is not an import)."""
    if isinstance(node, ast.ImportFrom) and node.module == "data_gen":
        return {a.name for a in node.names if a.name in MODULES}
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("data_gen."):
        return {(node.module or "").split(".")[1]}
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("data_gen.")}
    return set()


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_graph() -> dict[str, set[str]]:
    return {m: set().union(*(_targets(n) for n in ast.parse(p.read_text()).body if not _is_type_checking(n)))
            for m, p in MODULES.items()}


def test_no_data_gen_import_inside_a_function() -> None:
    lazy = [f"{m}.{fn.name} imports {sorted(_targets(sub))}"
            for m, p in MODULES.items()
            for fn in ast.walk(ast.parse(p.read_text()))
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            for sub in ast.walk(fn) if _targets(sub)]
    assert lazy == []


def test_module_imports_form_no_cycle() -> None:
    graph = _runtime_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            assert dep not in path, " -> ".join([*path, dep])
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])
    assert "world" in graph["calibrate"] and "calibrate" not in graph["world"]
