"""Mini WithAnyone, trained end to end on CPU: does the paper's recipe (paired references + ID loss + InfoNCE)
cut copy-paste against reconstruction training, in a synthetic world small enough to train here?

    python benchmarks/mini.py            # --quick (default): 3 seeds × arms A, B (≤ 20 min on an idle 2-core CPU)
    python benchmarks/mini.py --smoke    # one seed, reduced sizes (a few minutes)
    python benchmarks/mini.py --long     # bigger world, longer training, arm C too

Stages and their outputs live in --out (reused by a rerun). The last line is one JSON object: per-arm means of
Sim(GT), Sim(Ref), CP, count accuracy and identity confusion, and the face model's held-out verification
accuracy. See docs/mini.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    """Run the mini experiment and print the headline JSON last."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: 3 seeds, arms A and B")
    mode.add_argument("--smoke", action="store_true", help="one seed, reduced sizes")
    mode.add_argument("--long", action="store_true", help="bigger world, longer training, arms A, B, C")
    p.add_argument("--out", default=None, help="output folder (default runs/mini-<mode>)")
    p.add_argument("--arms", default=None, help="comma-separated arms among A,B,C (default per mode)")
    p.add_argument("--seeds", default=None, help="comma-separated adapter seeds (default per mode)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = p.parse_args(argv)

    import torch

    from withanyone.mini.experiment import LONG, QUICK, SMOKE, headline, run_experiment

    torch.set_num_threads(max(1, args.threads))
    name = "smoke" if args.smoke else "long" if args.long else "quick"
    cfg = {"smoke": SMOKE, "long": LONG, "quick": QUICK}[name]
    cfg = dataclasses.replace(cfg, out_dir=args.out or f"runs/mini-{name}")
    if args.arms:
        cfg = dataclasses.replace(cfg, arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()))
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")))
    bad = [a for a in cfg.arms if a not in ("A", "B", "C")]
    if bad:
        p.error(f"--arms: unknown arm(s) {bad}; choose among A, B, C")
    result = run_experiment(cfg)
    for arm, v in result["arms"].items():
        cells = "  ".join(f"{k}={v[k]['mean']:.3f}±{v[k]['std']:.3f}" if v[k]["mean"] is not None else f"{k}=n/a"
                          for k in ("sim_gt", "sim_ref", "cp", "cp_all", "count_acc", "identity_confusion"))
        print(f"{arm:>10}: {cells}")
    print(json.dumps(headline(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
