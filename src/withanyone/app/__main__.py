"""``python -m withanyone.app``: the same as ``withanyone app``."""

import typer

from .cli import app_command

if __name__ == "__main__":
    typer.run(app_command)
