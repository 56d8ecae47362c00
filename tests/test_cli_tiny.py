"""``withanyone generate --tiny`` and ``withanyone train --tiny``: the whole path without weights, on the
bundled photos, with the output marked as noise from a random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from withanyone.cli import app

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "faces"


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_generate_tiny_writes_a_noise_image_and_says_so(tmp_path):
    out = tmp_path / "two.png"
    res = CliRunner().invoke(app, ["generate", "--tiny", "-p", "a photo of two people in the park", "--no-progress",
                                   "-r", str(SAMPLES / "obama" / "1.jpg"), "-r", str(SAMPLES / "biden" / "1.jpg"),
                                   "-o", str(out), "--seed", "3"])
    assert res.exit_code == 0, res.output
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3) and img.std() > 1  # a real (noisy) picture, not a blank
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["tiny"] is True and "noise" in side["note"] and "random" in side["note"]
    assert side["height"] == side["width"] == 64 and side["steps"] == 4 and side["seed"] == 3
    assert len(side["boxes"]) == 2 and side["models"]["face_analyzer"]["backend"] == "dlib"
    assert "NOISE" in res.output and "random" in _flat(res.output)


def test_train_tiny_runs_the_whole_path_and_writes_a_loadable_checkpoint(tmp_path):
    from withanyone.data.reader import iter_samples
    from withanyone.model import WithAnyoneAdapter

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--tiny", "--no-progress", f"output_dir={run}", "max_steps=2"])
    assert res.exit_code == 0, res.output
    assert "noise" in _flat(res.output) and "random" in _flat(res.output)
    samples = list(iter_samples(run / "tiny-data" / "train"))
    assert all(s.embeddings.shape == (len(s.names), 512) for s in samples)
    assert len(samples) >= 8  # the bundled photos: group photos and one-person photos, each labelled
    assert {n for s in samples for n in s.names} >= {"obama", "biden", "rose_leslie"}
    ckpt = run / "checkpoints" / "step-0000002" / "withanyone.safetensors"
    adapter = WithAnyoneAdapter.from_authors_checkpoint(ckpt, num_double_blocks=2)
    assert adapter.load_report.ok and adapter.config.arcface_dim == 512
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(r["loss"]) for r in losses)
    assert json.loads((run / "config.json").read_text())["resolution"] == 64
