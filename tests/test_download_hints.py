"""Every download hint the project prints or documents is a command the installed ``hf`` CLI accepts, and a
gated repo's hint says to accept its licence and log in first (``huggingface-cli`` is gone from
huggingface_hub ≥ 1.0)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HF = Path(sys.executable).with_name("hf")
FLUX = "black-forest-labs/FLUX.1-dev"
TEXTS = sorted([*(REPO / "src").rglob("*.py"), *(REPO / "docs").glob("*.md"), REPO / "README.md"])
_CMD = re.compile(r"`(hf (?:download|auth)[^`]*)`")


def _messages() -> list[str]:
    """The hints as the code prints them, for the default repos."""
    from withanyone.app.models import LoadOptions, missing_weights_message
    from withanyone.faces.packs import _not_found_message
    from withanyone.hub import download_hint
    from withanyone.train.preflight import _download_hint

    return [missing_weights_message(FileNotFoundError("x"), LoadOptions()), _download_hint(FLUX),
            download_hint("WithAnyone/WithAnyone", ("withanyone.safetensors",)),
            _not_found_message("antelopev2", "antelopev2", [], False), _not_found_message("a/b", "b", [], True)]


def _commands(text: str) -> list[str]:
    found = _CMD.findall(text)
    found += [ln.strip() for ln in text.splitlines() if re.match(r"\s+hf (download|auth) ", ln)]  # banner blocks
    return found


def _hf_accepts(cmds: list[str]) -> dict[str, tuple[int, str]]:
    """Exit code and stderr of ``hf <cmd> --help`` per command (run side by side)."""
    runs = {}
    for cmd in cmds:
        args = shlex.split(cmd)
        assert args[0] == "hf", cmd
        # click parses every option before acting on --help: an unknown sub-command or option fails (exit 2)
        runs[cmd] = subprocess.Popen([str(HF), *args[1:], "--help"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
    return {cmd: (p.wait(timeout=120), p.stderr.read()) for cmd, p in runs.items()}


def test_no_hint_names_the_removed_huggingface_cli():
    for path in TEXTS:
        assert "huggingface-cli" not in path.read_text(encoding="utf-8"), path


@pytest.mark.skipif(not HF.is_file(), reason=f"no hf CLI next to {sys.executable}")
def test_every_hint_is_a_command_hf_accepts():
    cmds = {c for m in _messages() for c in _commands(m)}
    assert any(c.startswith(f"hf download {FLUX}") for c in cmds) and "hf auth login" in cmds
    documented = {c for p in TEXTS for c in _commands(p.read_text(encoding="utf-8")) if "{" not in c}
    assert any(FLUX in c for c in documented)  # docs/app.md and docs/train.md name the FLUX download
    cmds = {c.replace("…", "x").replace("<", "").replace(">", "") for c in cmds | documented}
    bogus = "hf download x/y --no-such-option"  # the check itself can fail
    results = _hf_accepts(sorted(cmds) + [bogus])
    assert results.pop(bogus)[0] != 0
    for cmd, (rc, err) in results.items():
        assert rc == 0, f"{cmd!r}: {err[-400:]}"


def test_gated_flux_hints_say_licence_and_login_and_skip_the_single_files(tmp_path):
    from withanyone.hub import download_command, download_hint

    hint = download_hint(FLUX)
    assert "gated" in hint and f"https://huggingface.co/{FLUX}" in hint and "`hf auth login`" in hint
    assert download_command(FLUX) == f"hf download {FLUX} --exclude flux1-dev.safetensors --exclude ae.safetensors"
    assert "gated" not in download_hint("google/siglip-base-patch16-256-i18n")
    from withanyone.app.models import LoadOptions, missing_weights_message

    banner = missing_weights_message(FileNotFoundError("x"), LoadOptions())
    assert "licence" in banner and "hf auth login" in banner


def test_generate_with_an_uncached_gated_base_says_licence_login_and_the_whole_download(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from withanyone.cli import app

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    photo = REPO / "samples" / "faces" / "obama" / "1.jpg"
    res = CliRunner().invoke(app, ["generate", "-p", "x", "-r", str(photo), "--offline", "-o", str(tmp_path / "o.png")])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "gated" in text and "hf auth login" in text and "licence" in text
    assert f"hf download {FLUX} --exclude" in text and f"hf download {FLUX} model_index.json" not in text
