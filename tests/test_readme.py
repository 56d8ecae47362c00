"""The README's Python snippets run as written: every name they use is imported or assigned first."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _undefined_names(code: str) -> list[str]:
    """Names read before any import/assignment binds them (top-level snippet code, in order)."""
    bound = set(dir(builtins))
    missing: list[str] = []
    for stmt in ast.parse(code).body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
                missing.append(node.id)
        for node in ast.walk(stmt):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
    return missing


def test_undefined_name_check_catches_a_missing_import():
    assert _undefined_names("x = torch.float32") == ["torch"]
    assert _undefined_names("import torch\nx = torch.float32") == []


def test_readme_python_snippets_import_what_they_use():
    blocks = _python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README has no python snippet"
    for code in blocks:
        assert _undefined_names(code) == [], code
