"""Shared fixtures: paths to the real photos in ../shared and a session-wide dlib analyzer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

# tests/comfyui_real runs in ComfyUI's own venv and pytest process (tests/test_comfyui_real.py starts it); ComfyUI's
# module names (nodes, utils, server, tests) would collide here. Only that inner run collects it.
collect_ignore = [] if os.environ.get("WITHANYONE_COMFYUI_INNER") == "1" else ["comfyui_real"]

REPO = Path(__file__).resolve().parents[1]
#: ``../shared/data/faces``; WITHANYONE_SHARED_FACES points elsewhere (e.g. from a git worktree).
SHARED_FACES = Path(os.environ.get("WITHANYONE_SHARED_FACES", REPO.parent / "shared" / "data" / "faces"))
SAMPLES = REPO / "samples" / "faces"


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """``../shared/data/faces`` (real photos); the test is skipped where it is absent (a user's clone)."""
    if not (SHARED_FACES / "labels.json").is_file():
        pytest.skip(f"real photos not available at {SHARED_FACES}")
    return SHARED_FACES


@pytest.fixture(scope="session")
def real_faces() -> Path:
    """Every real photo there is: ``../shared/data/faces`` where present (CI, the workspace), else the bundled
    ``samples/faces`` (same layout and labels, ≤ 512 px copies of 26 of its photos) — for tests of a property
    that must hold on every photo, so a fresh clone runs them too."""
    return SHARED_FACES if (SHARED_FACES / "labels.json").is_file() else SAMPLES


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The small photos bundled in the repo for the demo."""
    return SAMPLES


@pytest.fixture(scope="session")
def dlib_analyzer():
    """One dlib FaceAnalyzer for the whole session (loading its models takes ~1 s)."""
    from withanyone.faces import FaceAnalyzer

    return FaceAnalyzer("dlib")


@pytest.fixture(scope="module")
def pipe():
    """A WithAnyonePipeline of tiny seeded components with a tiny adapter (one per test module)."""
    from tiny_models.pipeline import get_dummy_components, tiny_adapter

    from withanyone.pipeline import WithAnyonePipeline

    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def plain():
    """Diffusers' plain FluxPipeline on the same tiny components (the reference the adapter must match)."""
    from diffusers import FluxPipeline
    from tiny_models.pipeline import get_dummy_components

    p = FluxPipeline(**get_dummy_components())
    p.set_progress_bar_config(disable=True)
    return p
