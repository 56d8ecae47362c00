"""A ``--device`` value checked before anything loads: ``auto``, ``cpu``, ``cuda``/``cuda:N``, ``mps``, ``xpu``."""

from __future__ import annotations

#: Device kinds the CLI and the app accept (``auto`` picks CUDA when present, else the CPU).
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps", "xpu")


def resolve_device(device: str, flag: str = "--device") -> str:
    """``device`` as a torch device string that exists on this machine; ``ValueError`` naming ``flag`` otherwise."""
    import torch

    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()) or (kind in ("auto", "cpu") and index):
        raise ValueError(f"{flag} {device!r}: not a device; choose auto, cpu, cuda (or cuda:N), mps or xpu")
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA GPU here (torch {torch.__version__} sees none); "
                             "use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{flag} {device}: Apple MPS is not available here; use --device cpu or auto")
    if kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"{flag} {device}: no Intel XPU here; use --device cpu or auto")
    return text
