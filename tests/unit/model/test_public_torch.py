"""adfed calls torch only through its public API (DESIGN.md: no private ``torch._*``)."""

from __future__ import annotations

import ast
from pathlib import Path

import adfed.model

MODEL_DIR = Path(adfed.model.__file__).parent
PACKAGE_DIR = MODEL_DIR.parent


def _private_uses(source: str) -> list[str]:
    """``torch._x`` / ``torch.a._x`` attribute chains and ``torch._x`` imports in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            chain = [node.attr]
            value = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "torch" and any(a.startswith("_") for a in chain):
                found.append(".".join(["torch", *reversed(chain)]))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"from {node.module}")
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names
                      if a.name.split(".")[0] == "torch" and any(p.startswith("_") for p in a.name.split("."))]
    return found


def test_the_checker_finds_private_calls() -> None:
    source = "import torch\nimport torch._dynamo\nfrom torch._C import foo\ntorch._foreach_add_(a, 1)\ntorch.linalg.vector_norm(x)\n"

    assert sorted(_private_uses(source)) == ["from torch._C", "torch._dynamo", "torch._foreach_add_"]


def test_model_package_uses_no_private_torch_function() -> None:
    files = sorted(MODEL_DIR.glob("*.py"))

    found = {f.name: uses for f in files if (uses := _private_uses(f.read_text()))}

    assert files and found == {}


def test_no_package_of_adfed_uses_a_private_torch_function() -> None:
    files = sorted(PACKAGE_DIR.rglob("*.py"))

    found = {str(f.relative_to(PACKAGE_DIR)): uses for f in files if (uses := _private_uses(f.read_text()))}

    assert len(files) > 30 and found == {}
