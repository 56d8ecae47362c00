"""Which FLUX.1 Kontext base a command line means (``--base kontext``, a hub id, a diffusers folder) and loading
it with the WithAnyone.K or .Ke adapter, failures as one line: shared by ``withanyone generate`` and ``edit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The Kontext base behind ``--base kontext`` (gated on the hub, like FLUX.1-dev).
KONTEXT_BASE = "black-forest-labs/FLUX.1-Kontext-dev"
#: Names of the Kontext base a user may give for :data:`KONTEXT_BASE`.
KONTEXT_ALIASES = ("kontext", "flux-kontext", "FLUX.1-Kontext-dev")


def resolve_kontext_base(base: str) -> str:
    """``kontext`` (and its aliases) → :data:`KONTEXT_BASE`; anything else unchanged."""
    return KONTEXT_BASE if base in KONTEXT_ALIASES else base


def is_kontext_base(base: str) -> bool:
    """Whether ``base`` names a FLUX.1 Kontext model: an alias, a hub id (``owner/name``, not a local path) with
    "kontext" in its name, or a diffusers folder whose ``model_index.json`` is a ``FluxKontextPipeline``."""
    import json
    import re

    if base in KONTEXT_ALIASES:
        return True
    if not Path(base).exists():
        return re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None and "kontext" in base.lower()
    index = Path(base) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") in ("FluxKontextPipeline",
                                                                     "WithAnyoneKontextPipeline")
    except (OSError, ValueError, AttributeError):
        return False


def check_kontext_base(base: str, offline: bool, fail: Any) -> None:
    """The Kontext base's files exist (locally, or cached when offline); else ``fail`` with how to get them."""
    import re

    from ..errors import WithAnyoneError
    from ..hub import download_hint
    from .loading import check_base

    try:
        check_base(base, None, offline or None)
    except (WithAnyoneError, FileNotFoundError) as exc:
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None and not Path(base).exists()
        raise fail(f"{exc}; {download_hint(base)}" if hub_id and "hf download" not in str(exc) else exc) from exc


def load_kontext(base: str, adapter: str, variant: str, *, adapter_file: str | None, siglip: Any, analyzer: Any,
                 face_pack: str, torch_dtype: Any, offline: bool, console: Any, fail: Any) -> Any:
    """``WithAnyoneKontextPipeline.from_pretrained`` (WithAnyone.K or .Ke); failures as one line."""
    from ..errors import WithAnyoneError
    from .kontext import WithAnyoneKontextPipeline

    console.print(f"loading {base} + {adapter} (WithAnyone.{variant}; {torch_dtype})")
    try:
        pipe = WithAnyoneKontextPipeline.from_pretrained(
            base=base, adapter=adapter, variant=variant, adapter_file=adapter_file, siglip=siglip,
            face_pack=analyzer, torch_dtype=torch_dtype, local_files_only=offline or None)
    except (WithAnyoneError, FileNotFoundError, ValueError) as exc:
        raise fail(exc) from exc
    pipe.model_sources["face_pack"] = str(face_pack)
    return pipe
