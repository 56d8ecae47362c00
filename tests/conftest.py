"""Shared fixtures: paths to the real photos in ../shared and a session-wide dlib analyzer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "data" / "faces"
SAMPLES = REPO / "samples" / "faces"


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """``../shared/data/faces`` (real photos); the test is skipped where it is absent (a user's clone)."""
    if not (SHARED_FACES / "labels.json").is_file():
        pytest.skip(f"real photos not available at {SHARED_FACES}")
    return SHARED_FACES


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The small photos bundled in the repo for the demo."""
    return SAMPLES


@pytest.fixture(scope="session")
def dlib_analyzer():
    """One dlib FaceAnalyzer for the whole session (loading its models takes ~1 s)."""
    from withanyone.faces import FaceAnalyzer

    return FaceAnalyzer("dlib")
