"""ComfyUI entry of the WithAnyone node pack: symlink (or copy) this folder into ComfyUI's ``custom_nodes/``.

Everything lives in the ``withanyone`` package (``withanyone.comfy``); install it into ComfyUI's Python with
``pip install -e "<repo>[model]"``. Without that, the package is taken from the repository this folder sits in.
"""

import os
import sys

try:
    import withanyone  # noqa: F401
except ImportError:  # a checkout symlinked into custom_nodes: use its src/
    _src = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "src")
    if os.path.isdir(os.path.join(_src, "withanyone")):
        sys.path.insert(0, _src)

from withanyone.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_folders  # noqa: E402

register_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
