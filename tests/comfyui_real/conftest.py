"""Fixtures for the real-ComfyUI tests; everything here is skipped cleanly without ``COMFYUI_DIR``.

Run in ComfyUI's venv, in a pytest process of their own::

    COMFYUI_DIR=/path/to/ComfyUI $COMFYUI_PYTHON -m pytest tests/comfyui_real -q

Fixtures: ``comfy_dir`` (Path), ``comfy`` (ComfyUI's modules imported in-process, see ``harness.import_comfyui``),
``comfy_server`` (one headless server per session, custom_nodes = the repo's ``comfyui/`` pack when present + the
test-only nodes), ``tiny_flux_path`` / ``tiny_flux`` (a 1+1-block tiny FLUX in diffusers keys and its diffusers model).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import torchvision_shim  # noqa: E402,F401  (transformers/diffusers import torchvision too, not only ComfyUI)

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    """The ComfyUI checkout named by ``$COMFYUI_DIR``; skips the test where there is none."""
    d = harness.comfyui_dir()
    if d is None:
        pytest.skip("no ComfyUI: set COMFYUI_DIR to a ComfyUI checkout (and run under its venv's python)")
    return d


@pytest.fixture(scope="session")
def comfy(comfy_dir):
    """ComfyUI's modules imported into this process (CPU); skips where they do not import (wrong venv)."""
    try:
        return harness.import_comfyui(comfy_dir)
    except ImportError as e:
        pytest.skip(f"ComfyUI at {comfy_dir} does not import under {sys.executable}: {e}")


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory) -> Path:
    """A tiny 1 double + 1 single block FLUX (seed 0) saved in diffusers key names."""
    path = tmp_path_factory.mktemp("tiny_flux") / "tiny_flux_1x1.safetensors"
    harness.write_tiny_flux(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_flux(tiny_flux_path):
    """The diffusers model whose weights ``tiny_flux_path`` holds (fp32, eval)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file
    from tiny_models.flux import tiny_flux_transformer

    model: FluxTransformer2DModel = tiny_flux_transformer(seed=None, num_layers=1, num_single_layers=1)
    model.load_state_dict(load_file(str(tiny_flux_path)))
    return model.eval()


@pytest.fixture(scope="session")
def comfy_server(comfy_dir, tmp_path_factory):
    """One headless ComfyUI for the session (``harness.ComfyServer``), stopped at teardown."""
    custom = {"withanyone_test_nodes": harness.TEST_NODES}
    if (harness.NODE_PACK / "__init__.py").is_file():
        custom["withanyone"] = harness.NODE_PACK
    server = harness.ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_base"),
                                 python=os.environ.get("COMFYUI_PYTHON"), custom_nodes=custom)
    try:
        yield server
    finally:
        server.stop()
