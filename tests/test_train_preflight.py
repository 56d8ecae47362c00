"""`withanyone train` checks its inputs before FLUX loads: one line naming the setting, exit 1, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from withanyone.cli import app
from withanyone.train.config import TrainConfig
from withanyone.train.preflight import PreflightError, check_inputs, explain_load_error

pytest.importorskip("webdataset")


@pytest.fixture()
def no_training(monkeypatch):
    """Fail loudly if the run got past the checks (i.e. would load FLUX)."""
    import withanyone.train.loop as loop

    def touched(*a, **k):
        raise AssertionError("training started (FLUX would load) before the inputs were checked")

    monkeypatch.setattr(loop, "train", touched)
    monkeypatch.setattr(loop, "load_components", touched)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A fake diffusers folder, a tiny 512-d ArcFace file, and 512-d / 128-d one-sample shards."""
    import torch
    from safetensors.torch import save_file

    from withanyone.data.shards import image_label, json_bytes, write_shard
    from withanyone.train.arcface import IResNet

    root = tmp_path_factory.mktemp("preflight")
    (root / "flux").mkdir()
    (root / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    torch.manual_seed(0)
    arc = IResNet((1, 1, 1, 1), (8, 8, 16, 16), 512)
    save_file({k: v.contiguous() for k, v in arc.state_dict().items()}, str(root / "arc.safetensors"))
    rng = np.random.default_rng(0)
    for dim in (512, 128):
        label = image_label("x", [[0, 0, 10, 10]], ["a"], [rng.standard_normal(dim).tolist()])
        write_shard(root / f"d{dim}" / "000000.tar", [{"__key__": "0", "jpg": b"jpg", "json": json_bytes(label)}])
    return root


def _args(inputs: Path, **kw) -> list[str]:
    base = {"pretrained_model": inputs / "flux", "arcface_weights": inputs / "arc.safetensors", "arcface_arch": "none",
            "train_shards": inputs / "d512", "output_dir": inputs / "run"}
    base.update(kw)
    return ["train", "--no-progress", *[f"{k}={v}" for k, v in base.items()]]


def _one_line(res) -> str:
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_good_inputs_pass(inputs):
    cfg = TrainConfig(pretrained_model=str(inputs / "flux"), arcface_weights=str(inputs / "arc.safetensors"),
                      arcface_arch=None, train_shards=str(inputs / "d512"))
    check_inputs(cfg)  # no exception
    with pytest.raises(PreflightError, match="holds an IResNet with blocks"):
        check_inputs(TrainConfig(pretrained_model=str(inputs / "flux"),
                                 arcface_weights=str(inputs / "arc.safetensors"), train_shards=str(inputs / "d512")))


def test_bad_local_model_path_is_one_line(inputs, no_training):
    msg = _one_line(CliRunner().invoke(app, _args(inputs, pretrained_model="/no/such/flux")))
    assert msg == "error: pretrained_model /no/such/flux: no such folder"
    msg = _one_line(CliRunner().invoke(app, _args(inputs, pretrained_model=inputs)))
    assert "no model_index.json" in msg


def test_missing_hub_weights_offline_suggest_hf_download(inputs, no_training, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    msg = _one_line(CliRunner().invoke(app, _args(inputs, pretrained_model="black-forest-labs/FLUX.1-dev",
                                                  local_files_only="true")))
    assert "hf download black-forest-labs/FLUX.1-dev" in msg
    assert "stacktrace" not in msg and "local_files_only=False" not in msg


def test_arcface_weights_are_checked_first(inputs, no_training, tmp_path):
    msg = _one_line(CliRunner().invoke(app, _args(inputs, arcface_weights=tmp_path / "glintr100.safetensors")))
    assert f"arcface_weights {tmp_path / 'glintr100.safetensors'}: no such file" in msg
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    assert "not a safetensors file" in _one_line(CliRunner().invoke(app, _args(inputs, arcface_weights=tmp_path /
                                                                                "junk.safetensors")))
    (tmp_path / "backbone.pth").write_bytes(b"pickle")
    assert "pickled weights" in _one_line(CliRunner().invoke(app, _args(inputs, arcface_weights=tmp_path /
                                                                         "backbone.pth")))


def test_shards_missing_or_128d_dlib_are_refused(inputs, no_training, tmp_path):
    msg = _one_line(CliRunner().invoke(app, _args(inputs, train_shards=tmp_path / "nothing")))
    assert "train_shards" in msg and "no such shard" in msg
    msg = _one_line(CliRunner().invoke(app, _args(inputs, train_shards=inputs / "d128")))
    assert "embeddings are 128-d" in msg and "gives 512-d" in msg and "--backend insightface" in msg
    msg = _one_line(CliRunner().invoke(app, _args(inputs, train_shards=str(inputs / "d512" / "00000{0..1}.tar"))))
    assert "1 of 2 shard(s) missing" in msg


def test_hub_errors_that_point_at_unseen_text_are_rewritten():
    cfg = TrainConfig()
    exc = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
                  "cached files. Check your internet connection or see how to run the library in offline mode at "
                  "'https://huggingface.co/docs/diffusers/installation#offline-mode'. Please check out the root "
                  "cause in the stacktrace above. (pass 'local_files_only=False' as input.)")
    text = explain_load_error(exc, cfg)
    assert "stacktrace" not in text and "local_files_only=False" not in text
    assert text.startswith("pretrained_model black-forest-labs/FLUX.1-dev: weights could not be loaded (We couldn't")
    assert "hf download black-forest-labs/FLUX.1-dev" in text
    assert explain_load_error(ValueError("plain\nproblem"), cfg) == "plain problem"


def test_arcface_from_an_onnx_pack_passes_preflight(inputs, tmp_path):
    pytest.importorskip("onnx")
    from tiny_models.arcface_onnx import export_tiny_iresnet, tiny_iresnet

    pack = tmp_path / "antelopev2"
    pack.mkdir()
    export_tiny_iresnet(pack / "glintr100.onnx", tiny_iresnet(seed=3))
    for source in (pack, pack / "glintr100.onnx"):  # the pack folder or its recognizer file, as load_arcface takes
        check_inputs(TrainConfig(pretrained_model=str(inputs / "flux"), arcface_weights=str(source),
                                 arcface_arch=None, train_shards=str(inputs / "d512")))  # no exception
        with pytest.raises(PreflightError, match="embeddings are 128-d, but the ArcFace"):  # its width was read
            check_inputs(TrainConfig(pretrained_model=str(inputs / "flux"), arcface_weights=str(source),
                                     arcface_arch=None, train_shards=str(inputs / "d128")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="arcface_weights"):
        check_inputs(TrainConfig(pretrained_model=str(inputs / "flux"), arcface_weights=str(tmp_path / "empty"),
                                 arcface_arch=None, train_shards=str(inputs / "d512")))
