"""Runs the real-ComfyUI tests (tests/comfyui_real) in ComfyUI's own venv, in a pytest process of their own.

Needs ``COMFYUI_DIR`` (a ComfyUI checkout) and ``COMFYUI_PYTHON`` (the python of a venv with ComfyUI's requirements
and ours; see docs/comfyui.md); skipped cleanly without them. ComfyUI's module names collide with other code and it
edits ``sys.path``, so it never runs inside this process.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_real_comfyui_suite_passes():
    comfy_dir, python = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")
    if not comfy_dir or not python:
        pytest.skip("set COMFYUI_DIR and COMFYUI_PYTHON to run the real-ComfyUI tests (docs/comfyui.md)")
    if not (Path(comfy_dir) / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={comfy_dir} has no main.py")
    if not Path(python).is_file():
        pytest.skip(f"COMFYUI_PYTHON={python} does not exist")
    env = dict(os.environ, WITHANYONE_COMFYUI_INNER="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([python, "-m", "pytest", "tests/comfyui_real", "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"tests/comfyui_real failed (exit {proc.returncode}):\n{tail}"
    summary = re.search(r"(\d+) passed", proc.stdout)
    assert summary and int(summary.group(1)) > 0, f"no real-ComfyUI test ran:\n{tail}"
    assert "skipped" not in proc.stdout.splitlines()[-1], f"some real-ComfyUI tests skipped:\n{tail}"
