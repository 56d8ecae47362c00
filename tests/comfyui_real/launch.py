"""Starts ComfyUI's ``main.py`` with the torchvision shim installed first: ``python launch.py COMFYUI_DIR [main.py args]``."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torchvision_shim  # noqa: F401  (defines the op schemas before ComfyUI imports torchvision)

    comfy_dir = Path(sys.argv[1]).resolve()
    sys.path[0] = str(comfy_dir)  # main.py's own folder first, as `python main.py` would have it
    os.chdir(comfy_dir)
    sys.argv = [str(comfy_dir / "main.py"), *sys.argv[2:]]
    runpy.run_path(str(comfy_dir / "main.py"), run_name="__main__")
