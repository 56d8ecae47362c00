"""Multi-process training on CPU: torchrun starts 2 processes (gloo); accelerate wraps the adapter in DDP.

After N steps both ranks hold bit-identical adapter weights, equal to one process replaying the same global
batch (gradient accumulation over the two ranks' batches); a run killed mid-way and resumed on 2 processes
ends with the weights of the uninterrupted run.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("webdataset")

from test_train_fixtures import tiny_components, tiny_config, tiny_multiid  # noqa: E402

from withanyone.train.data import MultiIDTrainDataset, batch_loader  # noqa: E402
from withanyone.train.loop import load_checkpoint, train  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield


def _shards(root: Path) -> Path:
    """Two shards from the tiny MultiID set (1- and 2-person photos mixed), one per rank."""
    from withanyone.data.reader import iter_samples
    from withanyone.data.shards import json_bytes, write_shard

    samples = list(itertools.islice(iter_samples(tiny_multiid() / "train"), 6))
    for k, part in enumerate((samples[0::2], samples[1::2])):
        items = [{"__key__": s.key, "jpg": s.image_bytes, "json": json_bytes(s.labels)} for s in part]
        write_shard(root / "shards" / f"{k:06d}.tar", items)
    return root / "shards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(cfg, out: Path, crash_at: int | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE / "train_worker.py"), str(out / "cfg.json"), str(out)]
    if crash_at is not None:
        cmd.append(str(crash_at))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config(tmp_path: Path, out: Path, **kw):
    base = dict(train_shards=str(_shards(tmp_path)), batch_size=1, max_steps=2, warmup_steps=0, num_workers=1,
                negative_pool=str(tiny_multiid() / "negatives.safetensors"), save_every=1)
    base.update(kw)
    return tiny_config(out, **base)


def test_two_processes_match_one_process_replaying_the_global_batch(tmp_path):
    cfg = _config(tmp_path, tmp_path / "ddp")
    run = _torchrun(cfg, tmp_path / "ddp")
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = _weights(tmp_path / "ddp" / "rank0.safetensors"), _weights(tmp_path / "ddp" / "rank1.safetensors")
    assert _equal(r0, r1)  # DDP kept both ranks bit-identical
    init = tiny_components(with_pool=False).adapter.state_dict()
    assert not _equal(r0, init)
    # one process, two micro-batches per step: rank 0's batch, then rank 1's; one thread as each torchrun
    # process (OMP_NUM_THREADS=1), so the kernels reduce in the same order
    mine, res = _replay(cfg, tmp_path)
    assert res.step == 2
    logged = json.loads((tmp_path / "ddp" / "rank0.json").read_text())["history"]
    assert _equal(mine, r0)  # bit for bit
    assert [h["loss"] for h in logged] == pytest.approx([h["loss"] for h in res.history], rel=1e-5)  # mean over ranks


def _replay(cfg, tmp_path: Path):
    """One process accumulating rank 0's and rank 1's batches (each rank's own shard stream), 1 thread."""
    streams = [batch_loader(MultiIDTrainDataset(cfg.train_shards, cfg.resolution, rank=r, world_size=2), 1)
               for r in (0, 1)]
    replay = (b for pair in zip(*streams, strict=False) for b in pair)
    one = tiny_config(tmp_path / "one", **{**cfg.to_dict(), "output_dir": str(tmp_path / "one"),
                                           "gradient_accumulation_steps": 2, "sharding": "none"})
    parts = tiny_components(with_pool=False)
    from withanyone.data import read_negative_pool

    parts.negative_pool = read_negative_pool(cfg.negative_pool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(one, parts, batches=replay)
    finally:
        torch.set_num_threads(threads)
    return parts.adapter.state_dict(), res


@pytest.mark.slow  # > 20 s; CI runs it (make test SLOW=1)
def test_fsdp2_shards_the_adapter_and_matches_the_replay_and_resumes(tmp_path):
    """The same 2-process checks with the adapter sharded by FSDP2 (torch's fully_shard over gloo)."""
    cfg = _config(tmp_path, tmp_path / "fsdp", sharding="fsdp2")
    run = _torchrun(cfg, tmp_path / "fsdp")
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = _weights(tmp_path / "fsdp" / "rank0.safetensors"), _weights(tmp_path / "fsdp" / "rank1.safetensors")
    assert _equal(r0, r1)
    full = sum(v.numel() for v in r0.values())
    for r in (0, 1):  # each rank held about half of the adapter
        local = json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text())["local_numel"]
        assert 0.4 * full < local < 0.6 * full
    mine, _ = _replay(cfg, tmp_path)
    # sharded reductions (reduce-scatter, the grad norm summed from shards) may round differently in the last bit
    assert all(torch.allclose(mine[k], r0[k], rtol=0, atol=1e-6) for k in r0)
    assert not _equal(r0, tiny_components(with_pool=False).adapter.state_dict())
    ckpt = _weights(tmp_path / "fsdp" / "checkpoints" / "step-0000002" / "withanyone.safetensors")
    assert _equal(ckpt, r0)  # the gathered full state, written by rank 0
    half = _torchrun(_config(tmp_path, tmp_path / "b", sharding="fsdp2", max_steps=1), tmp_path / "b")
    assert half.returncode == 0, half.stderr[-3000:]
    rest = _torchrun(_config(tmp_path, tmp_path / "b", sharding="fsdp2"), tmp_path / "b")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert _equal(_weights(tmp_path / "b" / "rank0.safetensors"), r0)


@pytest.mark.slow  # > 20 s; CI runs it (make test SLOW=1)
def test_two_processes_killed_mid_run_resume_to_the_uninterrupted_weights(tmp_path):
    straight = _torchrun(_config(tmp_path, tmp_path / "a", max_steps=3), tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _torchrun(_config(tmp_path, tmp_path / "b", max_steps=3), tmp_path / "b", crash_at=2)
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000001"]  # died at step 2 before its checkpoint
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-0000001", tiny_components(with_pool=False).adapter)
    ranks = state["extra"]["ranks"]
    assert len(ranks) == 2 and all(r["batches"] == 1 and r["slots"] == {"0": [0, 1]} for r in ranks)
    resumed = _torchrun(_config(tmp_path, tmp_path / "b", max_steps=3), tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _weights(tmp_path / "a" / "rank0.safetensors")
    assert _equal(a, _weights(tmp_path / "b" / "rank0.safetensors"))
    assert _equal(a, _weights(tmp_path / "b" / "rank1.safetensors"))
    hist = json.loads((tmp_path / "b" / "rank0.json").read_text())["history"]
    assert [h["step"] for h in hist] == [2, 3]


@pytest.mark.slow  # > 20 s; CI runs it (make test SLOW=1)
def test_uneven_shards_stop_both_ranks_together(tmp_path):
    """Rank 1's shard holds 1 sample, rank 0's 3 (one epoch): both stop after step 1 and exit, no hang."""
    from withanyone.data.reader import iter_samples
    from withanyone.data.shards import json_bytes, write_shard

    samples = list(itertools.islice(iter_samples(tiny_multiid() / "train"), 4))
    for k, part in enumerate((samples[:3], samples[3:])):
        write_shard(tmp_path / "uneven" / f"{k:06d}.tar",
                    [{"__key__": s.key, "jpg": s.image_bytes, "json": json_bytes(s.labels)} for s in part])
    cfg = _config(tmp_path, tmp_path / "u", train_shards=str(tmp_path / "uneven"), epochs=1, max_steps=5,
                  num_workers=0)
    run = _torchrun(cfg, tmp_path / "u")
    assert run.returncode == 0, run.stderr[-3000:]
    for r in (0, 1):
        assert json.loads((tmp_path / "u" / f"rank{r}.json").read_text())["step"] == 1
    assert json.loads((tmp_path / "u" / "checkpoints" / "latest.json").read_text())["step"] == 1
