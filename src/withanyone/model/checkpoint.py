"""The authors' checkpoint layout: load/save ``withanyone.safetensors``, split BFL single files, infer config.

Adapter keys carry no prefix in the release (``ipa_arc.{i}.to_q.weight``, ``arcface_in_arc.0.weight``,
…); a BFL single-file checkpoint may hold them next to the base FLUX keys (``double_blocks.*``,
``single_blocks.*``, ``img_in.*``, …), possibly under a ``model.diffusion_model.`` prefix. Only
safetensors are read: pickled formats are refused.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from withanyone.errors import ModelNotFoundError, WithAnyoneError

# checkpoint.py sits below adapter.py: it builds whatever adapter class it is given and never imports adapter.py.
AdapterT = TypeVar("AdapterT", bound=torch.nn.Module)

__all__ = [
    "ADAPTER_MODULES",
    "AUTHORS_FILENAME",
    "AUTHORS_REPO",
    "CheckpointError",
    "LoadReport",
    "load_safetensors",
    "resolve_authors_checkpoint",
    "split_authors_state_dict",
    "infer_adapter_config",
    "load_authors_checkpoint",
    "save_state_dict",
]

logger = logging.getLogger(__name__)

AUTHORS_REPO = "WithAnyone/WithAnyone"
AUTHORS_FILENAME = "withanyone.safetensors"
ADAPTER_MODULES = ("ipa_arc", "ipa_sig", "arcface_in_arc", "arcface_in_sig", "siglip_in_sig")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "model.", "transformer.")
_FLUX_BLOCKS_57 = (19, 38)


class CheckpointError(WithAnyoneError, ValueError):
    """A checkpoint file is unreadable, pickled, or does not hold a WithAnyone adapter; names the file."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


@dataclass
class LoadReport:
    """What :func:`load_authors_checkpoint` did: inferred config, missing/unexpected adapter keys, base keys."""

    source: str
    config: dict[str, Any]
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    base_keys: list[str] = field(default_factory=list)
    #: Release keys the forward never uses (the Kontext-edit layout's ``siglip_in``); neither missing nor unexpected.
    unused_keys: list[str] = field(default_factory=list)
    #: Which key layout was read: ``"flux"`` (``ipa_arc``/``ipa_sig``) or ``"kontext_e"`` (``ipa``/``arcface_in``).
    layout: str = "flux"

    @property
    def ok(self) -> bool:
        """True when every adapter weight was found and none was left over."""
        return not self.missing_keys and not self.unexpected_keys

    def __str__(self) -> str:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", … (+{len(keys) - 5})" if len(keys) > 5 else "")

        parts = [f"loaded WithAnyone adapter from {self.source}"]
        if self.missing_keys:
            parts.append(f"{len(self.missing_keys)} missing: {head(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"{len(self.unexpected_keys)} unexpected: {head(self.unexpected_keys)}")
        if self.base_keys:
            parts.append(f"{len(self.base_keys)} base-model keys set aside")
        if self.unused_keys:
            parts.append(f"{len(self.unused_keys)} release keys unused by its forward: {head(self.unused_keys)}")
        return "; ".join(parts)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file to CPU tensors; other formats are refused (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"checkpoint file not found: {p}")
    if p.suffix != ".safetensors":
        raise CheckpointError(
            str(p), f"only .safetensors is read (refusing to unpickle a {p.suffix or 'suffix-less'} file)"
        )
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(str(p), f"not a readable safetensors file ({exc})") from exc


def resolve_authors_checkpoint(source: str | Path, *, local_files_only: bool = False) -> Path:
    """A file, a folder holding ``withanyone.safetensors``, or a hub id (downloaded / taken from the cache)."""
    p = Path(source)
    if p.is_file():
        return p
    if p.is_dir():
        cand = p / AUTHORS_FILENAME
        if cand.is_file():
            return cand
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise ModelNotFoundError(
            f"{p} holds no {AUTHORS_FILENAME}" + (f" (and {len(found)} other .safetensors files)" if found else "")
        )
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        from ..hub import download_hint

        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(text, AUTHORS_FILENAME, local_files_only=local_files_only))
        except Exception as exc:  # offline, gated, missing file: say exactly which file
            raise ModelNotFoundError(
                f"cannot get {AUTHORS_FILENAME} from hub repo {text} ({type(exc).__name__}: {exc}); "
                f"{download_hint(text, (AUTHORS_FILENAME,))}, or pass the local path"
            ) from exc
    raise ModelNotFoundError(f"checkpoint not found: {source} (neither a file, a folder nor a hub id)")


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] in ADAPTER_MODULES:
            return key[len(prefix) :]
    return key


def split_authors_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split into (adapter keys without prefix, every other key = base model) — BFL single files hold both."""
    adapter, base = {}, {}
    for key, value in state_dict.items():
        k = _strip_prefix(key)
        if k.split(".", 1)[0] in ADAPTER_MODULES:
            adapter[k] = value
        else:
            base[key] = value
    return adapter, base


def _count_blocks(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def infer_adapter_config(
    adapter_sd: dict[str, torch.Tensor],
    base_sd: dict[str, torch.Tensor] | None = None,
    *,
    num_double_blocks: int | None = None,
    head_dim: int = 64,
    source: str = "<state dict>",
) -> dict[str, Any]:
    """The ``WithAnyoneAdapter`` config implied by tensor shapes (block split from base keys or FLUX's 19+38)."""
    if not adapter_sd:
        raise CheckpointError(source, f"holds no WithAnyone adapter keys ({', '.join(ADAPTER_MODULES)})")

    def shape(key: str) -> tuple[int, ...] | None:
        t = adapter_sd.get(key)
        return None if t is None else tuple(t.shape)

    if shape("arcface_in_arc.0.weight") is not None:
        four_w, arcface_dim = shape("arcface_in_arc.0.weight")
        hidden = four_w // 4
    elif shape("ipa_arc.0.norm2.weight") is not None:
        hidden, arcface_dim = shape("ipa_arc.0.norm2.weight")[0], 512
    else:
        raise CheckpointError(source, "has neither arcface_in_arc.0.weight nor ipa_arc.0.norm2.weight")
    tokens_shape = shape("arcface_in_arc.3.weight")
    num_arc_tokens = tokens_shape[0] // hidden if tokens_shape else 8
    q_shape = shape("ipa_arc.0.to_q.weight") or shape("ipa_sig.0.to_q.weight")
    inner = q_shape[0] if q_shape else 24 * head_dim
    if inner % head_dim:
        raise CheckpointError(source, f"cross-attention width {inner} is not a multiple of head_dim={head_dim}")
    total = max(_count_blocks(adapter_sd, r"ipa_arc\.(\d+)\."), _count_blocks(adapter_sd, r"ipa_sig\.(\d+)\."))
    if total == 0:
        raise CheckpointError(source, "holds no ipa_arc.{i} / ipa_sig.{i} cross-attention blocks")
    if num_double_blocks is None and base_sd:
        keys = list(base_sd)
        stripped = [re.sub(r"^(model\.diffusion_model\.|diffusion_model\.|transformer\.)", "", k) for k in keys]
        doubles = _count_blocks(stripped, r"double_blocks\.(\d+)\.") or _count_blocks(
            stripped, r"transformer_blocks\.(\d+)\."
        )
        if doubles:
            num_double_blocks = doubles
    if num_double_blocks is None:
        if total == sum(_FLUX_BLOCKS_57):
            num_double_blocks = _FLUX_BLOCKS_57[0]
        else:
            raise CheckpointError(
                source,
                f"holds {total} cross-attention blocks; cannot tell how many follow double-stream blocks — "
                f"pass num_double_blocks=",
            )
    if not 0 <= num_double_blocks <= total:
        raise CheckpointError(source, f"num_double_blocks={num_double_blocks} does not fit {total} blocks")
    sig_shape = shape("siglip_in_sig.0.weight")
    use_siglip = any(k.split(".", 1)[0] in ("ipa_sig", "siglip_in_sig", "arcface_in_sig") for k in adapter_sd)
    return {
        "num_double_blocks": int(num_double_blocks),
        "num_single_blocks": int(total - num_double_blocks),
        "hidden_size": int(hidden),
        "num_heads": int(inner // head_dim),
        "head_dim": int(head_dim),
        "arcface_dim": int(arcface_dim),
        "siglip_dim": int(sig_shape[1]) if sig_shape else 768,
        "num_arc_tokens": int(num_arc_tokens),
        "use_siglip": bool(use_siglip),
    }


def load_authors_checkpoint(
    cls: type[AdapterT],
    source: str | Path | dict[str, torch.Tensor],
    *,
    num_double_blocks: int | None = None,
    head_dim: int = 64,
    strict: bool = False,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool = False,
) -> AdapterT:
    """Build ``cls`` from the authors' layout; weights are assigned without a random-init pass."""
    if isinstance(source, dict):
        name, state_dict = "<state dict>", source
    else:
        path = resolve_authors_checkpoint(source, local_files_only=local_files_only)
        name, state_dict = str(path), load_safetensors(path)
    adapter_sd, base_sd = split_authors_state_dict(state_dict)
    config = infer_adapter_config(
        adapter_sd, base_sd, num_double_blocks=num_double_blocks, head_dim=head_dim, source=name
    )
    with torch.device("meta"):
        model = cls(**config)
    expected = model.state_dict()
    for key, value in adapter_sd.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise CheckpointError(
                name, f"{key} has shape {tuple(value.shape)}, the inferred config expects {tuple(expected[key].shape)}"
            )
    result = model.load_state_dict(adapter_sd, strict=False, assign=True)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(
            name, f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    for module in model.modules():  # missing weights: materialise and initialise as a fresh layer would
        own = dict(module.named_parameters(recurse=False))
        if any(p.is_meta for p in own.values()):
            loaded = {n: p.data for n, p in own.items() if not p.is_meta}
            module.to_empty(device="cpu", recurse=False)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            for n, data in loaded.items():  # keep the weights the checkpoint did hold
                getattr(module, n).data = data
    dtype = torch_dtype
    if dtype is None:
        dtypes = [t.dtype for t in adapter_sd.values() if t.is_floating_point()]
        dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    if any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    model.load_report = LoadReport(
        source=name, config=config, missing_keys=missing, unexpected_keys=unexpected, base_keys=sorted(base_sd)
    )
    if missing or unexpected:
        logger.warning("%s", model.load_report)
    return model


def save_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        from ..io import current_umask

        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # like any other writer, not mkstemp's 0600
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
