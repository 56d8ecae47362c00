"""Loading the released Kontext checkpoints, WithAnyone.K.preview (text-to-image) and WithAnyone.Ke.preview (edit).

Two key layouts are read, detected from the keys:

- **FLUX layout** (``ipa_arc.{i}``, ``ipa_sig.{i}``, ``arcface_in_arc``, ``arcface_in_sig``, ``siglip_in_sig``): the
  release's ``withanyone`` package, which its README runs for K (``gradio_app.py --model_type flux-kontext``).
- **Kontext-edit layout** (``ipa.{i}``, ``arcface_in``, ``siglip_in``): the release's ``withanyone_kontext_e``
  package (``Flux.ipa`` = one ``PerceiverAttentionCA`` per block, ``Flux.arcface_in`` = Linear-GELU-LayerNorm-Linear
  to 8 tokens, ``Flux.siglip_in``), used by ``gradio_edit.py`` for Ke. Its forward is ArcFace-only
  (``arc_only=True``; the demo says "only arcface supported now"): ``ipa.{i}`` → our ``ipa_arc.{i}``,
  ``arcface_in`` → ``arcface_in_arc``, and ``siglip_in`` is reported as a known release key that the forward
  never uses (``LoadReport.unused_keys``), not as unexpected.

Base-model keys (``double_blocks.*``, ``img_in.*``, …) next to the adapter's are set aside as today's loader does.

**File names (assumption).** The release's README links K and Ke only to the hub repo ``WithAnyone/WithAnyone``
and names no file; we assume :data:`KONTEXT_FILES` and every loader takes ``adapter_file=`` to override.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from withanyone.errors import ModelNotFoundError
from withanyone.model.checkpoint import (
    _PREFIXES,
    AUTHORS_REPO,
    CheckpointError,
    load_authors_checkpoint,
    load_safetensors,
)

__all__ = [
    "KONTEXT_BASE", "KONTEXT_FILES", "KONTEXT_VARIANTS", "RELEASE_KONTEXT_MODULES", "detect_layout",
    "from_release_kontext_state_dict", "load_kontext_adapter", "resolve_kontext_checkpoint",
    "to_release_kontext_state_dict",
]

#: The base model the K/Ke adapters were trained on.
KONTEXT_BASE = "black-forest-labs/FLUX.1-Kontext-dev"
#: ``variant`` → assumed file name in ``WithAnyone/WithAnyone`` (override with ``adapter_file=``).
KONTEXT_FILES = {"K": "withanyone_kontext.safetensors", "Ke": "withanyone_kontext_edit.safetensors"}
KONTEXT_VARIANTS = tuple(KONTEXT_FILES)
#: Top-level module names of the release's Kontext-edit adapter (``withanyone_kontext_e/flux/model.py``).
RELEASE_KONTEXT_MODULES = ("ipa", "arcface_in", "siglip_in")
_FLUX_MODULES = ("ipa_arc", "ipa_sig", "arcface_in_arc", "arcface_in_sig", "siglip_in_sig")
_RENAME = {"ipa": "ipa_arc", "arcface_in": "arcface_in_arc"}
_UNUSED = ("siglip_in",)


def _strip(key: str, modules: tuple[str, ...]) -> str | None:
    """``key`` without a known prefix if its first component is one of ``modules``, else None."""
    for prefix in ("", *_PREFIXES):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.split(".", 1)[0] in modules:
                return rest
    return None


def detect_layout(keys: Any) -> str:
    """``"kontext_e"`` (``ipa.{i}`` / ``arcface_in``), ``"flux"`` (``ipa_arc.{i}`` …) or ``"none"``."""
    keys = list(keys)
    if any(_strip(k, _FLUX_MODULES) for k in keys):
        return "flux"
    if any(_strip(k, RELEASE_KONTEXT_MODULES) for k in keys):
        return "kontext_e"
    return "none"


def from_release_kontext_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Kontext-edit layout → (our adapter keys, other = base-model keys, unused release keys (``siglip_in.*``))."""
    adapter, base, unused = {}, {}, []
    for key, value in state_dict.items():
        k = _strip(key, RELEASE_KONTEXT_MODULES)
        if k is None:
            base[key] = value
            continue
        head, rest = k.split(".", 1)
        if head in _UNUSED:
            unused.append(k)
        else:
            adapter[f"{_RENAME[head]}.{rest}"] = value
    return adapter, base, sorted(unused)


def to_release_kontext_state_dict(adapter: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An ArcFace-only adapter's weights under the Kontext-edit layout's names (``ipa.{i}``, ``arcface_in``)."""
    back = {v: k for k, v in _RENAME.items()}
    out = {}
    for key, value in adapter.state_dict().items():
        head, rest = key.split(".", 1)
        if head not in back:
            raise CheckpointError("<adapter>", f"{key}: the Kontext-edit layout has no SigLIP branch (ArcFace only)")
        out[f"{back[head]}.{rest}"] = value.detach().contiguous()
    return out


def resolve_kontext_checkpoint(source: str | Path, variant: str = "Ke", adapter_file: str | None = None,
                               *, local_files_only: bool = False, revision: str | None = None) -> Path:
    """A K/Ke file: a path, a folder holding ``adapter_file``, or a hub repo (default ``WithAnyone/WithAnyone``);
    a missing file raises a one-line :class:`ModelNotFoundError` naming it."""
    if variant not in KONTEXT_FILES:
        raise ValueError(f"variant must be one of {', '.join(KONTEXT_VARIANTS)}, got {variant!r}")
    fname = adapter_file or KONTEXT_FILES[variant]
    p = Path(str(source)).expanduser()
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise ModelNotFoundError(f"WithAnyone.{variant} checkpoint {p} is missing")
        return p
    if p.is_dir():
        cand = p / fname
        if not cand.is_file():
            raise ModelNotFoundError(f"WithAnyone.{variant}: {p} holds no {fname} (pass adapter_file= to name the "
                                     f"file)")
        return cand
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        from ..hub import download_hint, hub_offline

        offline = bool(local_files_only) or hub_offline()
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(text, fname, revision=revision, local_files_only=offline))
        except Exception as exc:  # offline, gated, missing file: one line naming the file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(
                f"cannot get WithAnyone.{variant} file {fname} from hub repo {text} ({type(exc).__name__}: {reason}); "
                f"{download_hint(text, (fname,))}, pass adapter_file= if the repo names it differently, or a local "
                f"path") from None
    raise ModelNotFoundError(f"WithAnyone.{variant} checkpoint not found: {source} (neither a file, a folder nor "
                             f"a hub id)")


def load_kontext_adapter(source: str | Path | dict[str, torch.Tensor] = AUTHORS_REPO, variant: str = "Ke",
                         adapter_file: str | None = None, *, num_double_blocks: int | None = None,
                         head_dim: int = 64, strict: bool = False, torch_dtype: torch.dtype | None = None,
                         local_files_only: bool = False, revision: str | None = None) -> Any:
    """A ``WithAnyoneAdapter`` from a K or Ke checkpoint in either layout; ``.load_report`` lists missing and
    unexpected adapter keys, base keys set aside and unused release keys (``siglip_in`` of the edit layout)."""
    from withanyone.model.adapter import WithAnyoneAdapter

    if isinstance(source, dict):
        name, sd = "<state dict>", source
    else:
        path = resolve_kontext_checkpoint(source, variant, adapter_file, local_files_only=local_files_only,
                                          revision=revision)
        name, sd = str(path), load_safetensors(path)
    layout = detect_layout(sd)
    if layout == "none":
        raise CheckpointError(name, f"holds no WithAnyone adapter keys (neither {', '.join(_FLUX_MODULES)} nor the "
                                    f"Kontext-edit layout's {', '.join(RELEASE_KONTEXT_MODULES)})")
    unused: list[str] = []
    if layout == "kontext_e":
        adapter_sd, base_sd, unused = from_release_kontext_state_dict(sd)
        sd = {**adapter_sd, **base_sd}
    model = load_authors_checkpoint(WithAnyoneAdapter, sd, num_double_blocks=num_double_blocks, head_dim=head_dim,
                                    strict=strict, torch_dtype=torch_dtype)
    report = model.load_report
    report.source = name
    report.layout = layout
    report.unused_keys = unused
    model.kontext_variant = variant
    return model
