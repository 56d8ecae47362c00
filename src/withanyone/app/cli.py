"""``withanyone app``: serve WithAnyone Studio."""

from __future__ import annotations

import errno

import typer

from .models import PRESETS


def app_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 to serve the network)."),
    port: int = typer.Option(7860, "--port", help="Port."),
    share: bool = typer.Option(False, "--share", help="Also open a public Gradio share link."),
    base: str = typer.Option("black-forest-labs/FLUX.1-dev", "--base", help="FLUX hub id or diffusers folder."),
    adapter: str = typer.Option("WithAnyone/WithAnyone", "--adapter", help="Adapter hub id, folder or .safetensors."),
    siglip: str = typer.Option("google/siglip-base-patch16-256-i18n", "--siglip", help="SigLIP hub id or folder."),
    face_pack: str = typer.Option("antelopev2", "--face-pack", help="insightface pack (name or folder)."),
    low_vram: str = typer.Option("none", "--low-vram", help=f"Memory preset: {', '.join(PRESETS)}."),
    transformer_file: str | None = typer.Option(None, "--transformer-file", help="Single-file transformer instead "
                                                "of the base's: GGUF (Q8_0, Q5/Q4, K-quants) or fp8 .safetensors."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda (cuda:N), mps or xpu."),
    offline: bool = typer.Option(False, "--offline", help="Use only files already on disk / in the hub cache."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random model, no weights needed (images are noise)."),
    out: str | None = typer.Option(None, "--out", help="Folder for generated images and sidecars (default: a temp "
                                   "folder)."),
    kontext_base: str = typer.Option("black-forest-labs/FLUX.1-Kontext-dev", "--kontext-base", help="Edit tab: "
                                     "FLUX.1 Kontext hub id or diffusers folder (loaded on the first edit)."),
    kontext_adapter: str = typer.Option("WithAnyone/WithAnyone", "--kontext-adapter", help="Edit tab: the "
                                        "WithAnyone.Ke adapter (hub id, folder or .safetensors)."),
    kontext_adapter_file: str | None = typer.Option(None, "--kontext-adapter-file", help="Edit tab: file name of "
                                                    "the Ke checkpoint inside --kontext-adapter (default: the "
                                                    "release's)."),
) -> None:
    """Serve WithAnyone Studio (Generate + Edit + Bench explorer) in the browser."""
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        typer.echo("error: the app needs Gradio: pip install 'withanyone[app]'", err=True)
        raise typer.Exit(1) from exc
    try:  # before any model loads: a bad value or a busy port is one line, not a traceback minutes later
        if low_vram not in PRESETS:
            raise ValueError(f"--low-vram {low_vram!r}: choose from {', '.join(PRESETS)}")
        from ..pipeline.device import resolve_device

        resolve_device(device)
        check_port(host, port)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    from . import launch
    from .models import LoadOptions

    try:
        launch(LoadOptions(base=base, adapter=adapter, siglip=siglip, face_pack=face_pack, low_vram=low_vram,
                           tiny=tiny, transformer_file=transformer_file, offline=offline, device=device,
                           kontext_base=kontext_base, kontext_adapter=kontext_adapter,
                           kontext_adapter_file=kontext_adapter_file),
               host=host, port=port, share=share, out_dir=out)
    except OSError as exc:  # the port was taken between the check and the launch
        typer.echo(f"error: --port {port}: cannot serve on {host}:{port} ({' '.join(str(exc).split())})", err=True)
        raise typer.Exit(1) from exc


def check_port(host: str, port: int) -> None:
    """``ValueError`` naming ``--port``/``--host`` when the port is out of range, taken, or the host unknown."""
    import socket

    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: not a TCP port (1–65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address of this machine ({exc.strerror})") from exc
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except PermissionError as exc:
            raise ValueError(f"--port {port}: not allowed to listen there (ports under 1024 need root); "
                             "choose e.g. --port 7860") from exc
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
                raise ValueError(f"--port {port}: already in use on {host} (another app running?); choose another "
                                 "port, e.g. --port 7861") from exc
            raise ValueError(f"--host {host}: cannot listen there ({exc.strerror})") from exc
