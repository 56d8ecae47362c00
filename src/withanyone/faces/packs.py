"""Locate an insightface-format model pack (a folder of ONNX files) and route its models by role.

A pack is found, in this order, from:

1. an explicit folder path (``"/models/antelopev2"``), or a folder holding one pack folder deeper;
2. a name under ``$INSIGHTFACE_HOME/models/<name>`` (default ``~/.insightface/models``), also the nested
   ``<name>/<name>/`` layout that unzipping the official archives often produces;
3. a Hugging Face hub repo id (``"owner/repo"``; for a bare name, a known mirror from :data:`HUB_MIRRORS`)
   through ``huggingface_hub.snapshot_download``: over the network when online, from the local hub cache
   only when ``HF_HUB_OFFLINE`` is set.

Nothing found → :class:`~withanyone.errors.ModelNotFoundError` whose message lists every place looked at
and how to get the pack. Roles are decided by inspecting each model's inputs and outputs, as insightface's
``model_zoo`` does, without importing ``insightface``: an SCRFD detector has one NCHW image input and 6, 9,
10 or 15 outputs; an ArcFace recognizer has one square input (≥ 112, multiple of 16) and one 2-D output;
landmark (192×192), attribute (96×96) and swapper (two inputs) models are recognised and ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError
from ..hub import download_command

#: Hub repos known to mirror a pack under its usual name (third-party mirrors of insightface's
#: non-commercial models; used only when a bare name is not found locally).
HUB_MIRRORS: dict[str, str] = {"antelopev2": "DIAMONIK7777/antelopev2"}

#: Where insightface's own releases publish the official archives (named in error messages).
OFFICIAL_RELEASES = "https://github.com/deepinsight/insightface/releases/download/v0.7/{name}.zip"

#: Number of SCRFD outputs → (strides, has keypoints). 3 strides use 2 anchors per location, 5 use 1.
SCRFD_LAYOUTS: dict[int, tuple[tuple[int, ...], bool]] = {
    6: ((8, 16, 32), False),
    9: ((8, 16, 32), True),
    10: ((8, 16, 32, 64, 128), False),
    15: ((8, 16, 32, 64, 128), True),
}

ROLES = ("detection", "recognition", "landmark", "attribute", "swapper")


@dataclass(frozen=True)
class ModelInfo:
    """What one ONNX file is: its role (or ``None``), input/output names and shapes (``None`` = dynamic)."""

    path: Path
    role: str | None
    inputs: tuple[tuple[str, tuple[int | str | None, ...]], ...] = ()
    outputs: tuple[tuple[str, tuple[int | str | None, ...]], ...] = ()
    error: str | None = None
    #: Names of the graph's first 8 nodes (ArcFace input normalisation is inferred from them).
    first_nodes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for error messages: file name and role or problem."""
        what = self.error or self.role or "unrecognised model"
        return f"{self.path.name} [{what}]"


@dataclass(frozen=True)
class ModelPack:
    """A located pack: its folder, the chosen detector and recognizer files, and every model inspected."""

    folder: Path
    detector: Path
    recognizer: Path
    models: tuple[ModelInfo, ...] = field(default_factory=tuple)
    source: str = "path"

    def model(self, path: Path) -> ModelInfo:
        """The inspection record of one of the pack's files."""
        for info in self.models:
            if info.path == path:
                return info
        raise KeyError(path)


def insightface_home() -> Path:
    """``$INSIGHTFACE_HOME`` or ``~/.insightface`` (the root holding ``models/<pack>``)."""
    return Path(os.environ.get("INSIGHTFACE_HOME") or Path.home() / ".insightface").expanduser()


def hub_offline() -> bool:
    """True when the hub must not be contacted (``HF_HUB_OFFLINE`` set now or when the hub was imported)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        return True
    return bool(constants.HF_HUB_OFFLINE)


def find_pack(pack: str | os.PathLike, *, hub: bool = True, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the pack's ONNX files, or :class:`ModelNotFoundError` listing where we looked.

    ``pack`` is a folder path, a pack name (``"antelopev2"``, ``"buffalo_l"``) or a hub repo id; ``hub=False``
    never touches the hub (nor its cache); ``cache_dir`` overrides the hub cache folder.
    """
    text = os.fspath(pack)
    if not text:
        raise ValueError("pack must be a folder, a pack name or a hub repo id, got an empty string")
    looked: list[str] = []
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            found = _onnx_folder(path, path.name)
            if found is not None:
                return found
            looked.append(f"{path} (folder exists but holds no .onnx file, nor does a sub-folder)")
        else:
            looked.append(f"{path} (a file, not a pack folder)")
    else:
        looked.append(f"{path.absolute()} (no such folder)")
    name = path.name
    is_name = len(path.parts) == 1 and not path.is_absolute()
    if is_name:
        root = insightface_home() / "models"
        for cand in (root / name, root / name / name):
            if cand.is_dir() and any(cand.glob("*.onnx")):
                return cand
            looked.append(f"{cand} ({'no .onnx file' if cand.is_dir() else 'missing'})")
    repo_id = text if _looks_like_repo_id(text) and not path.exists() else HUB_MIRRORS.get(text) if is_name else None
    if repo_id is not None:
        if hub:
            folder, note = _from_hub(repo_id, name, cache_dir)
            if folder is not None:
                return folder
            looked.append(note)
        else:
            looked.append(f"hub repo {repo_id} (skipped: hub=False)")
    raise ModelNotFoundError(_not_found_message(text, name, looked, repo_given=not is_name and repo_id is not None))


def inspect_model(path: str | os.PathLike) -> ModelInfo:
    """Read an ONNX file's graph inputs/outputs (no weights are run) and decide its role."""
    import onnx  # noqa: PLC0415 — heavy import kept inside

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 — protobuf raises assorted errors on a corrupt file
        return ModelInfo(path, None, error=f"unreadable ONNX file: {type(exc).__name__}: {exc}".strip())
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = tuple((i.name, _shape(i)) for i in graph.input if i.name not in weights)
    outputs = tuple((o.name, _shape(o)) for o in graph.output)
    first = tuple(n.name for n in graph.node[:8])
    return ModelInfo(path, _role(inputs, outputs), inputs, outputs, first_nodes=first)


def route_models(folder: str | os.PathLike) -> tuple[ModelInfo, ...]:
    """Inspect every ``*.onnx`` file of ``folder`` (sorted by name) and tag each with its role."""
    return tuple(inspect_model(p) for p in sorted(Path(folder).glob("*.onnx")))


def load_pack(pack: str | os.PathLike, *, hub: bool = True, cache_dir: str | os.PathLike | None = None,
              detector: str | None = None, recognizer: str | None = None) -> ModelPack:
    """Find a pack and pick its detector and recognizer (first of each role by file name, or the named file).

    Raises :class:`ModelNotFoundError` when the pack lacks a usable keypoint detector or a recognizer.
    """
    folder = find_pack(pack, hub=hub, cache_dir=cache_dir)
    models = route_models(folder)
    if Path(os.fspath(pack)).expanduser().exists():
        source = "path"
    elif insightface_home() in folder.parents:
        source = "insightface_home"
    else:
        source = "hub"
    det = _pick(models, "detection", detector, folder)
    rec = _pick(models, "recognition", recognizer, folder)
    det_info = next(m for m in models if m.path == det)
    if not SCRFD_LAYOUTS[len(det_info.outputs)][1]:
        raise ModelNotFoundError(
            f"detector {det} has {len(det_info.outputs)} outputs and no keypoint branch; ArcFace alignment needs "
            "a 5-point SCRFD detector (9 or 15 outputs, e.g. det_10g.onnx or scrfd_10g_bnkps.onnx)"
        )
    return ModelPack(folder=folder, detector=det, recognizer=rec, models=models, source=source)


# --------------------------------------------------------------------------------------------- internals


def _shape(value_info: Any) -> tuple[int | str | None, ...]:
    dims = value_info.type.tensor_type.shape.dim
    out: list[int | str | None] = []
    for d in dims:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _role(inputs: tuple, outputs: tuple) -> str | None:
    if not inputs:
        return None
    shape = inputs[0][1]
    if len(shape) != 4:
        return None
    if len(outputs) >= 5:
        channels_ok = shape[1] == 3 or not isinstance(shape[1], int)
        return "detection" if channels_ok and len(outputs) in SCRFD_LAYOUTS else None
    h, w = shape[2], shape[3]
    if not (isinstance(h, int) and isinstance(w, int)):
        return None
    if h == w == 192:
        return "landmark"
    if h == w == 96:
        return "attribute"
    if len(inputs) == 2 and h == w == 128:
        return "swapper"
    if h == w and h >= 112 and h % 16 == 0 and len(inputs) == 1 and len(outputs) == 1 and len(outputs[0][1]) == 2:
        return "recognition"
    return None


def _pick(models: tuple[ModelInfo, ...], role: str, wanted: str | None, folder: Path) -> Path:
    if wanted is not None:
        for m in models:
            if m.path.name == wanted or str(m.path) == wanted:
                if m.role != role:
                    raise ModelNotFoundError(f"{m.path} is not a {role} model ({m.describe()})")
                return m.path
        raise ModelNotFoundError(f"no file {wanted!r} in model pack {folder}")
    for m in models:
        if m.role == role:
            return m.path
    listing = ", ".join(m.describe() for m in models) or "no .onnx files"
    need = ("an SCRFD detector (e.g. det_10g.onnx, scrfd_10g_bnkps.onnx)" if role == "detection"
            else "an ArcFace recognizer (e.g. glintr100.onnx, w600k_r50.onnx)")
    raise ModelNotFoundError(f"model pack {folder} has no {role} model: need {need}; found {listing}")


def _onnx_folder(path: Path, name: str) -> Path | None:
    """``path`` if it holds .onnx files, else the shallowest sub-folder that does (``<name>/`` preferred)."""
    if any(path.glob("*.onnx")):
        return path
    if (path / name).is_dir() and any((path / name).glob("*.onnx")):
        return path / name
    hits = sorted({p.parent for p in path.glob("**/*.onnx")}, key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _from_hub(repo_id: str, name: str, cache_dir: str | os.PathLike | None) -> tuple[Path | None, str]:
    offline = hub_offline()
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        snap = snapshot_download(repo_id, allow_patterns=["*.onnx", "**/*.onnx"], cache_dir=cache_dir,
                                 local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 — network, auth, missing repo or cache miss: all mean "not here"
        where = "local hub cache only, HF_HUB_OFFLINE is set" if offline else "online"
        return None, f"hub repo {repo_id} ({where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    folder = _onnx_folder(Path(snap), name.split("/")[-1])
    if folder is None:
        return None, f"hub repo {repo_id} (downloaded to {snap}, but it holds no .onnx file)"
    return folder, ""


def _not_found_message(text: str, name: str, looked: list[str], repo_given: bool) -> str:
    lines = [f"insightface model pack {text!r} not found. Looked in:"]
    lines += [f"  - {item}" for item in looked]
    if repo_given:
        lines.append(f"To get it: check the repo id, then run online (HF_HUB_OFFLINE unset) or fetch it first with "
                     f"`{download_command(text)}`; or download the pack's ONNX files into a folder and pass "
                     "that folder.")
        return "\n".join(lines)
    home = insightface_home() / "models" / name
    lines.append("To get it: download the pack's ONNX files into a folder and pass that folder, or unpack it to "
                 f"{home} (INSIGHTFACE_HOME overrides ~/.insightface), e.g. "
                 f"`curl -LO {OFFICIAL_RELEASES.format(name=name)} && unzip {name}.zip -d {home.parent}`"
                 + (f" or `{download_command(HUB_MIRRORS[name], local_dir=str(home))}`" if name in HUB_MIRRORS
                    else "")
                 + "; or pass a hub repo id (owner/name) while online. The models are for non-commercial "
                   "research use (insightface licence).")
    return "\n".join(lines)
