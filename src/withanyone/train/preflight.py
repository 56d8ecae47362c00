"""Cheap checks of a training config's inputs, run before FLUX loads (minutes, tens of GB).

:func:`check_inputs` looks at the FLUX base (local folder, or hub id present in the cache when offline), the
ArcFace file (safetensors header only: which network, how wide its embeddings are) and the first samples of
the training shards (their embeddings must be as wide as the ArcFace's: shards built with the dlib backend
hold 128-d descriptors, the adapter trains on 512-d ArcFace ones). Each problem is a one-line
:class:`PreflightError` naming the setting, the file and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from withanyone.errors import WithAnyoneError

__all__ = ["PreflightError", "check_inputs", "check_pretrained_model", "check_arcface_weights",
           "check_train_shards", "explain_load_error"]

#: How many leading samples of the shards are read to learn their embedding width.
SAMPLES_CHECKED = 16


class PreflightError(WithAnyoneError, ValueError):
    """A training input is missing or does not fit (checked before any model loads)."""


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1


def _offline(config: Any) -> bool:
    if getattr(config, "local_files_only", False):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        return False


def _hub_cache() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's default


def _download_hint(repo: str) -> str:
    from withanyone.hub import download_hint

    return f"{download_hint(repo)}; or set pretrained_model to a local diffusers folder"


def check_pretrained_model(config: Any) -> None:
    """The FLUX base exists: a local diffusers folder (``model_index.json``), or a hub id cached when offline."""
    ref = str(config.pretrained_model)
    path = Path(ref).expanduser()
    if path.exists() or _looks_like_path(ref):
        if not path.exists():
            raise PreflightError(f"pretrained_model {ref}: no such folder")
        if not (path / "model_index.json").is_file():
            raise PreflightError(f"pretrained_model {ref}: not a diffusers pipeline folder (no model_index.json)")
        return
    if not _offline(config):
        return  # online: diffusers fetches it (or fails, and explain_load_error says why)
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(ref, "model_index.json", cache_dir=_hub_cache(), revision=config.revision)
    if not isinstance(got, str):
        raise PreflightError(f"pretrained_model {ref}: not in the local hub cache, and hub access is off "
                             f"(local_files_only or HF_HUB_OFFLINE); {_download_hint(ref)}")


def check_arcface_weights(config: Any) -> int:
    """The ArcFace is a readable safetensors arcface_torch backbone or an insightface ONNX recognizer / pack
    folder; returns its embedding width."""
    from safetensors import SafetensorError, safe_open

    from withanyone.errors import WithAnyoneError
    from withanyone.train.arcface import ARCHS, load_arcface

    path = Path(str(config.arcface_weights)).expanduser()
    where = f"arcface_weights {config.arcface_weights}"
    if path.is_dir() or (path.suffix.lower() == ".onnx" and path.is_file()):  # a pack: read the graph once here
        try:
            return int(load_arcface(path, getattr(config, "arcface_arch", None)).fc.out_features)
        except WithAnyoneError as exc:  # no recognizer in the folder, a foreign graph, a wrong arch
            raise PreflightError(f"{where}: {' '.join(str(exc).split())}") from exc
    if not path.is_file():
        raise PreflightError(f"{where}: no such file; convert the glint360k r100 backbone once to safetensors "
                             "(docs/train.md, 'ArcFace') and point arcface_weights at it")
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".pkl", ".ckpt"):
        raise PreflightError(f"{where}: pickled weights are not loaded; convert once to safetensors (docs/train.md)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if "fc.weight" not in keys:
                raise PreflightError(f"{where}: no 'fc.weight' (not an arcface_torch IResNet backbone?)")
            dim = int(f.get_slice("fc.weight").get_shape()[0])
    except (SafetensorError, OSError) as exc:
        raise PreflightError(f"{where}: not a safetensors file ({' '.join(str(exc).split())})") from exc
    arch = getattr(config, "arcface_arch", None)
    if arch is not None:
        layers = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{s}.")}) for s in range(1, 5))
        if ARCHS.get(arch) != layers:
            raise PreflightError(f"{where}: holds an IResNet with blocks {list(layers)}, not {arch!r} "
                                 "(set arcface_arch to match, or to none)")
    return dim


def check_train_shards(config: Any, embedding_dim: int) -> None:
    """``train_shards`` exist, and their samples carry embeddings ``embedding_dim`` wide."""
    from braceexpand import braceexpand

    from withanyone.data.errors import DatasetError
    from withanyone.data.reader import _dataset, _urls, parse_sample

    where = f"train_shards {config.train_shards}"
    try:
        urls = _urls(str(config.train_shards))
    except DatasetError as exc:
        raise PreflightError(f"train_shards: {exc}") from exc
    local = [u for u in urls if not u.startswith(("http://", "https://", "pipe:"))]
    files = [p for u in local for p in braceexpand(u)]
    missing = [p for p in files if not Path(p).is_file()]
    if missing:
        raise PreflightError(f"{where}: {len(missing)} of {len(files)} shard(s) missing, e.g. {missing[0]}")
    if not files:
        return  # remote shards: checked when streamed
    widths: dict[int, int] = {}
    seen = 0
    for shard in files:  # like training: a bad sample or an unreadable shard is skipped, not fatal
        try:
            for d in _dataset(shard):
                try:
                    emb = parse_sample(d).embeddings
                except DatasetError:
                    continue
                seen += 1
                if emb is not None and emb.size:
                    widths[int(emb.shape[1])] = widths.get(int(emb.shape[1]), 0) + 1
                if seen >= SAMPLES_CHECKED:
                    break
        except Exception:  # noqa: BLE001 - a torn tar: training skips it too
            continue
        if seen >= SAMPLES_CHECKED:
            break
    if not widths:
        raise PreflightError(f"{where}: no usable training samples: none of the first {seen} readable samples "
                             "carries face embeddings (labels 'embeddings'); build the shards with "
                             "`withanyone build-dataset`")
    if embedding_dim not in widths:
        got = max(widths, key=widths.get)
        hint = (" (dlib's 128-d descriptors: rebuild the shards with `withanyone build-dataset --backend "
                "insightface`, whose ArcFace embeddings are 512-d)" if got == 128 else "")
        raise PreflightError(f"{where}: embeddings are {got}-d, but the ArcFace of arcface_weights gives "
                             f"{embedding_dim}-d{hint}")


def check_inputs(config: Any) -> None:
    """Every cheap check, in order: FLUX base, ArcFace file, shards vs. the ArcFace's width."""
    check_pretrained_model(config)
    dim = check_arcface_weights(config)
    check_train_shards(config, dim)
    for key in ("negative_pool", "init_adapter"):
        value = getattr(config, key, None)
        if value and not Path(str(value)).expanduser().exists():
            raise PreflightError(f"{key} {value}: no such file or folder")
    if getattr(config, "paired_ratio", 0) > 0 and getattr(config, "reference_shards", None):
        ref = str(config.reference_shards)
        if "{" not in ref and not ref.startswith(("http://", "https://", "pipe:")) and not Path(ref).exists():
            raise PreflightError(f"reference_shards {ref}: no such file or folder")


def explain_load_error(exc: BaseException, config: Any) -> str:
    """One line for an error raised while loading: hub messages that point at text the user never sees
    ("the stacktrace above", "pass local_files_only=False") become what happened and what to do."""
    text = " ".join(str(exc).split())
    if "stacktrace above" in text or "local_files_only=False" in text or "outgoing traffic has been disabled" in text:
        first = text.split(" (")[0].split(". ")[0].rstrip(".")
        ref = str(config.pretrained_model)
        return f"pretrained_model {ref}: weights could not be loaded ({first}); {_download_hint(ref)}"
    return text
