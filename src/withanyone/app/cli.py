"""``withanyone app``: serve WithAnyone Studio."""

from __future__ import annotations

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
    device: str = typer.Option("auto", "--device", help="cuda, cpu or auto."),
    offline: bool = typer.Option(False, "--offline", help="Use only files already on disk / in the hub cache."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random model, no weights needed (images are noise)."),
    out: str | None = typer.Option(None, "--out", help="Folder for generated images and sidecars (default: a temp "
                                   "folder)."),
) -> None:
    """Serve WithAnyone Studio (Generate + Bench explorer) in the browser."""
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        typer.echo("error: the app needs Gradio: pip install 'withanyone[app]'", err=True)
        raise typer.Exit(1) from exc
    if low_vram not in PRESETS:
        raise typer.BadParameter(f"{low_vram!r}: choose from {', '.join(PRESETS)}", param_hint="--low-vram")
    from . import launch
    from .models import LoadOptions

    launch(LoadOptions(base=base, adapter=adapter, siglip=siglip, face_pack=face_pack, low_vram=low_vram, tiny=tiny,
                       transformer_file=transformer_file, offline=offline, device=device),
           host=host, port=port, share=share, out_dir=out)
