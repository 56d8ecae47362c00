"""One rank of the multi-process training tests (started by torchrun from test_train_distributed.py; not a test).

argv: config.json out_dir [crash_at_step]. Trains the tiny parts with ``train()`` and writes this rank's
adapter weights to ``out_dir/rank{RANK}.safetensors``; with crash_at_step the process dies (exit 17) when
that step is reached, before its checkpoint is written.
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


def main() -> None:
    cfg = TrainConfig(**json.loads(Path(sys.argv[1]).read_text())).validate()
    out = Path(sys.argv[2])
    crash = int(sys.argv[3]) if len(sys.argv) > 3 else None
    parts = tiny_components(with_pool=False)
    if cfg.negative_pool:
        from withanyone.data import read_negative_pool

        parts.negative_pool = read_negative_pool(cfg.negative_pool)

    def on_step(step: int, losses: dict) -> None:
        if crash is not None and step >= crash:
            os._exit(17)  # killed mid-run: the checkpoint of this step is never written

    result = train(cfg, parts, on_step=on_step)
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
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"step": result.step, "history": result.history,
                                                       "skipped": result.skipped,
                                                       "local_numel": local}))


if __name__ == "__main__":
    main()
