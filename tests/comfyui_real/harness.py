"""Harness for the real-ComfyUI tests: find ComfyUI, import its modules in-process, write tiny FLUX files, run a server.

These tests run in ComfyUI's own venv and their own pytest process (``$COMFYUI_PYTHON -m pytest tests/comfyui_real``):
ComfyUI's top-level module names (``nodes``, ``utils``, ``server``, ``tests``) collide with other code and it edits
``sys.path``. Nothing of ComfyUI is in this repository; ``COMFYUI_DIR`` points at an existing checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NODE_PACK = REPO / "comfyui"  # the repository's custom-node entry folder (when present)
TEST_NODES = HERE / "withanyone_test_nodes"


def comfyui_dir() -> Path | None:
    """``$COMFYUI_DIR`` when it names a ComfyUI checkout (a folder with ``main.py`` and ``comfy/``), else None."""
    d = os.environ.get("COMFYUI_DIR")
    if not d:
        return None
    p = Path(d).expanduser().resolve()
    return p if (p / "main.py").is_file() and (p / "comfy").is_dir() else None


_IMPORTED: dict = {}


def import_comfyui(comfy_dir: Path) -> dict:
    """Import ComfyUI's modules into this process (CPU, no argv parsing) and return them by name.

    Puts ``comfy_dir`` first on ``sys.path``, installs the torchvision shim, sets ComfyUI's ``--cpu`` flag before
    ``comfy.model_management`` is imported, loads ComfyUI's built-in nodes (``nodes.NODE_CLASS_MAPPINGS`` with the
    ``comfy_extras`` ones) and makes FLUX detection read widths from shapes (the test-only wrapper).
    """
    if _IMPORTED:
        return _IMPORTED
    sys.path.insert(0, str(HERE))
    import torchvision_shim  # noqa: F401

    sys.path.insert(0, str(comfy_dir))
    import comfy.options  # noqa: F401  (args_parsing stays False: ComfyUI must not parse pytest's argv)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_smart_memory = False
    import asyncio

    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes

    if "ModelSamplingFlux" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from withanyone_test_nodes import detection

    detection.install()
    _IMPORTED.update(
        comfy=comfy, folder_paths=folder_paths, nodes=nodes, model_management=comfy.model_management,
        model_patcher=comfy.model_patcher, patcher_extension=comfy.patcher_extension, sd=comfy.sd,
        samplers=comfy.samplers, sample=comfy.sample, utils=comfy.utils,
    )
    return _IMPORTED


def write_tiny_flux(path: Path, seed: int = 0, num_layers: int = 1, num_single_layers: int = 1):
    """Save a tiny random diffusers ``FluxTransformer2DModel`` (diffusers key names) to ``path``; return the model.

    Widths are the repo's tiny FLUX (``tests/tiny_models/flux.py``: 192 wide, 3×64 heads, 64-d text, 32-d pooled,
    16 latent channels); ComfyUI converts the diffusers keys to BFL's on load.
    """
    from safetensors.torch import save_file
    from tiny_models.flux import tiny_flux_transformer

    model = tiny_flux_transformer(seed=seed, num_layers=num_layers, num_single_layers=num_single_layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def load_unet(comfy, path, weight_dtype: str = "default"):
    """ComfyUI's UNETLoader node on ``path`` (its folder registered as a diffusion_models folder)."""
    comfy["folder_paths"].add_model_folder_path("diffusion_models", str(path.parent))
    return comfy["nodes"].UNETLoader().load_unet(path.name, weight_dtype)[0]


def comfy_velocity(comfy, patcher, x, sigma, cond, transformer_options=None, load: bool = True):
    """The FLUX velocity ComfyUI's diffusion model predicts for latent ``x`` [B,16,H,W] at ``sigma``.

    As sampling does (``comfy.sampler_helpers.prepare_model_patcher``): the patcher's wrappers and callbacks go
    into ``transformer_options`` and ``load_models_gpu`` loads it with its patches' models (an adapter's).
    """
    ext = comfy["patcher_extension"]
    if load:
        comfy["model_management"].load_models_gpu([patcher])
    opts = dict(patcher.model_options.get("transformer_options", {}))
    opts["wrappers"] = ext.merge_nested_dicts(ext.copy_nested_dicts(opts.get("wrappers", {})), patcher.wrappers)
    opts["callbacks"] = ext.merge_nested_dicts(ext.copy_nested_dicts(opts.get("callbacks", {})), patcher.callbacks)
    opts.update(transformer_options or {})
    ctx, extra = cond[0]
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        return dm(x, torch.tensor([sigma]), ctx, y=extra["pooled_output"],
                  guidance=torch.tensor([extra["guidance"]]), transformer_options=opts)


def diffusers_velocity(model, x, sigma, cond):
    """The same velocity from diffusers' FluxTransformer2DModel on the packed latent (unpacked back)."""
    b, c, h, w = x.shape
    packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    ctx, extra = cond[0]
    with torch.no_grad():
        out = model(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=extra["pooled_output"],
                    timestep=torch.tensor([sigma]), guidance=torch.tensor([extra["guidance"]]),
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(ctx.shape[1], 3), return_dict=False)[0]
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI (``main.py --cpu``) on 127.0.0.1 with its own base directory; :meth:`stop` ends it."""

    def __init__(self, comfy_dir: Path, base: Path, python: str | None = None, custom_nodes: dict | None = None,
                 start_timeout: float = 120.0):
        self.comfy_dir, self.base = comfy_dir, base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for sub in ("custom_nodes", "models/diffusion_models", "models/loras", "models/withanyone", "models/clip_vision",
                    "models/insightface", "input",
                    "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for name, target in (custom_nodes or {}).items():
            link = base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        self.log_path = base / "server.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
        cmd = [python or sys.executable, str(HERE / "launch.py"), str(comfy_dir), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--log-stdout"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._wait_up(start_timeout)

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} at start:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """The server's output so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, route: str, timeout: float = 10):
        """GET ``route`` and decode its JSON."""
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict) -> str:
        """POST an API-format graph to ``/prompt``; return its prompt id (raises with ComfyUI's error body)."""
        data = json.dumps({"prompt": prompt, "client_id": "withanyone-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"/prompt refused the graph: {e.read().decode(errors='replace')}") from None
        if answer.get("node_errors"):  # ComfyUI still runs the outputs that validated: a partial graph
            raise RuntimeError(f"/prompt: some nodes failed validation: {json.dumps(answer['node_errors'])[:4000]}")
        return answer["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll ``/history/<id>`` until the prompt is done; return its entry (raises on an execution error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                if entry["status"].get("status_str") == "error":
                    msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(msgs)[:4000]}")
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died running {prompt_id}:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 120) -> dict:
        """Post ``prompt`` and wait for its history entry."""
        return self.wait_history(self.post_prompt(prompt), timeout)

    def stop(self) -> None:
        """End the server (its whole process group) and close the log."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def copy_model(src: Path, base: Path, folder: str, name: str | None = None) -> str:
    """Copy ``src`` into the server's ``models/<folder>/``; return the file name its loaders take."""
    dst = base / "models" / folder / (name or src.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst.name
