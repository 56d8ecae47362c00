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


def _quick_start(text: str) -> list[str]:
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    assert block, "README has no quick-start block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_quick_start_is_demo_then_test_and_ci_runs_the_same_test_command():
    assert _quick_start(README.read_text(encoding="utf-8")) == ["make demo", "make test"]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip().startswith("make ")]
    assert commands == ["make test SLOW=1"], commands


def test_make_test_skips_slow_tests_unless_slow_is_set():
    import os
    import subprocess

    # under `make test SLOW=1` (CI) the variable reaches us through MAKEFLAGS: drop make's own environment
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SLOW")}

    def recipe(*args: str) -> str:
        out = subprocess.run(["make", "-n", "-W", ".venv/.dev", *args, "test"], cwd=README.parent,
                             capture_output=True, text=True, check=True, env=env).stdout
        return next(line for line in out.splitlines() if "-m pytest" in line)

    assert '-m "not slow"' in recipe() or "-m not slow" in recipe()
    assert "not slow" not in recipe("SLOW=1")
