"""``withanyone train --config cfg.toml [key=value ...]``: train the identity adapter with a progress bar."""

from __future__ import annotations

from pathlib import Path

import typer


def train_command(
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides of config fields, e.g. "
                                                 "phase=2 batch_size=8 train_shards=multiid/train_rec"),
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML or JSON config (keys of TrainConfig, "
                                       "at top level or in a train table)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random model on a shard built from the bundled photos: "
                              "the whole training path on CPU in seconds, no weights (the checkpoint is noise)."),
) -> None:
    """Train the WithAnyone adapter (FLUX frozen); resumes from OUTPUT_DIR/checkpoints when present."""
    import json

    from rich.console import Console

    from withanyone.train.config import ConfigError, load_config

    console = Console(stderr=True)
    try:
        if tiny:
            from withanyone.train.tiny import tiny_train_config

            cfg = tiny_train_config(config, overrides or [])
        else:
            cfg = load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except FileNotFoundError as exc:  # --tiny: the bundled photos are missing
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if print_config:
        typer.echo(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return

    from withanyone.train.preflight import PreflightError, check_inputs, check_train_shards, explain_load_error

    try:  # before FLUX loads: the base, the ArcFace file and the shards' embedding width
        if tiny:
            check_train_shards(cfg, 512)
        else:
            check_inputs(cfg)
    except PreflightError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from withanyone.errors import WithAnyoneError
    from withanyone.train.loop import TrainingError, train

    columns = (TextColumn("[bold]train[/bold] phase {task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[losses]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=cfg.max_steps, phase=cfg.phase, losses="")

        def on_step(step: int, losses: dict[str, float]) -> None:
            text = " ".join(f"{k} {losses[k]:.4f}" for k in ("loss", "flow", "id", "cl") if k in losses)
            bar.update(task, completed=step, losses=text)

        try:
            if tiny:
                from withanyone.train.tiny import TINY_NOTE, tiny_train_components

                console.print(f"[yellow]{TINY_NOTE}[/yellow]; data: {cfg.train_shards}")
                result = train(cfg, tiny_train_components(cfg), on_step=on_step)
            else:
                result = train(cfg, on_step=on_step)
        except (WithAnyoneError, OSError) as exc:  # bad data/weights/paths: a message, not a traceback
            kind = "training error" if isinstance(exc, TrainingError) else type(exc).__name__
            typer.echo(f"{kind}: {explain_load_error(exc, cfg)}", err=True)
            raise typer.Exit(1) from exc
    console.print(f"step {result.step}: checkpoint {result.checkpoint}; skipped samples {result.skipped or 'none'}")
    if tiny:
        console.print(f"[yellow]note:[/yellow] {TINY_NOTE}")
