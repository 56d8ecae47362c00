"""One rank of the multi-process training tests (started by torchrun from test_train_distributed.py /
test_train_deepspeed.py; not a test).

argv: config.json out_dir [crash_at_step], or ``--jobs jobs.json`` (a list of ``{"config", "out", "crash_at",
"interrupt_at"}`` run one after another in the same processes, so one launch pays the start-up once). Each job
trains the tiny parts with ``train()`` and writes this rank's adapter weights to ``out/rank{RANK}.safetensors``;
with crash_at the process dies (exit 17) when that step is reached, before its checkpoint is written; with
interrupt_at ``train()`` raises there instead (nothing of that step is saved) and the next job runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from safetensors.torch import save_file  # noqa: E402
from test_train_fixtures import tiny_components  # noqa: E402

from withanyone.train.config import TrainConfig  # noqa: E402
from withanyone.train.loop import train  # noqa: E402


class Interrupted(Exception):
    """Raised from on_step to stop a run the way a kill would, minus the process exit."""


def run(config_path: Path, out: Path, crash: int | None = None, interrupt: int | None = None) -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh accelerator per job
    GradientState._reset_state()
    cfg = TrainConfig(**json.loads(Path(config_path).read_text())).validate()
    parts = tiny_components(with_pool=False)
    if cfg.negative_pool:
        from withanyone.data import read_negative_pool

        parts.negative_pool = read_negative_pool(cfg.negative_pool)

    def on_step(step: int, losses: dict) -> None:
        if crash is not None and step >= crash:
            os._exit(17)  # killed mid-run: the checkpoint of this step is never written
        if interrupt is not None and step >= interrupt:
            raise Interrupted(step)

    try:
        result = train(cfg, parts, on_step=on_step)
    except Interrupted:
        return
    rank = int(os.environ.get("RANK", "0"))
    params = list(parts.adapter.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: this rank holds a partition of each parameter
        import deepspeed

        local = sum(int(p.ds_tensor.numel()) for p in params)
        with deepspeed.zero.GatheredParameters(params):  # collective
            state = {k: v.detach().clone() for k, v in parts.adapter.state_dict().items()}
    else:
        sd = parts.adapter.state_dict()
        local = sum(int(v.to_local().numel()) if hasattr(v, "to_local") else int(v.numel()) for v in sd.values())
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v)  # FSDP2: gather the shards (collective)
                 for k, v in parts.adapter.state_dict().items()}
    acc = AcceleratorState()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"step": result.step, "history": result.history,
                                                       "skipped": result.skipped, "local_numel": local,
                                                       "accelerate_ranks": [acc.num_processes, acc.process_index],
                                                       "distributed_type": str(acc.distributed_type)}))


def main() -> None:
    if sys.argv[1] == "--jobs":
        for job in json.loads(Path(sys.argv[2]).read_text()):
            run(Path(job["config"]), Path(job["out"]), job.get("crash_at"), job.get("interrupt_at"))
    else:
        run(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)


if __name__ == "__main__":
    main()
