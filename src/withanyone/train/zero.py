"""DeepSpeed ZeRO-2 / ZeRO-3 for the training loop (``sharding = "zero2" | "zero3"``), through accelerate's plugin.

The engine wraps the :class:`~withanyone.train.loop.IdentityDenoiser` (only the adapter's weights), so ZeRO
shards exactly what trains. Checkpoints keep our layout: :func:`gather_state` collects the full fp32 master
weights and AdamW moments by parameter name (a collective under both stages), and :func:`restore_state`
writes them back into the engine's partitions, so a DeepSpeed checkpoint resumes with or without DeepSpeed.

Two accelerate behaviours without a GPU (accelerate 1.16, measured on CPU over gloo): with ``cpu=False``
every rank reports ``num_processes=1`` / ``process_index=0`` under DeepSpeed (rank-dependent code takes the
rank from ``torch.distributed``: :func:`world_and_rank`), and ``cpu=True`` (or ``ACCELERATE_USE_CPU``) drops
the DeepSpeed plugin without a word (:func:`check_engine` refuses to train on then).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from withanyone.train.config import ConfigError, TrainConfig

__all__ = ["ZERO_STAGES", "available", "deepspeed_config", "make_plugin", "check_engine", "check_not_engine",
           "world_and_rank",
           "is_engine", "gather_state", "restore_state"]

#: ``sharding`` value → ZeRO stage
ZERO_STAGES = {"zero2": 2, "zero3": 3}

#: The release's ``config/deepspeed/zero2_config.json`` (the adapter's engine there), "auto" filled from the config.
_ZERO2 = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}, "contiguous_gradients": True,
                                "overlap_comm": True}}
#: The release's ``zero3_config.json`` without its CPU offload of parameters and optimizer (that needs DeepSpeed's
#: compiled CPU Adam; pass the release's file as ``deepspeed_config`` to get it — untested).
_ZERO3 = {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": 16777216, "stage3_prefetch_bucket_size": 15099494,
                                "stage3_param_persistence_threshold": 40960, "sub_group_size": 1e9,
                                "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                                "stage3_gather_16bit_weights_on_model_save": True}}


def available() -> bool:
    """Whether ``deepspeed`` is importable (``pip install 'withanyone[deepspeed]'``, with ``DS_BUILD_OPS=0``)."""
    return importlib.util.find_spec("deepspeed") is not None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config for ``config.sharding``: the release's stage settings, overridden by the JSON in
    ``config.deepspeed_config`` (if any), with batch size, accumulation, clipping and precision from ``config``
    wherever the file says "auto" or nothing."""
    stage = ZERO_STAGES.get(config.sharding)
    if stage is None:
        raise ConfigError(f"sharding={config.sharding!r} is not a DeepSpeed stage ({', '.join(ZERO_STAGES)})")
    user: dict[str, Any] = {}
    if config.deepspeed_config:
        path = Path(config.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"{path}: DeepSpeed config file not found")
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: top level must be a JSON object")
        file_stage = user.get("zero_optimization", {}).get("stage", stage)
        if file_stage != stage:
            raise ConfigError(f"{path}: zero_optimization.stage is {file_stage}, but sharding={config.sharding!r}")
    ds = _merge(_ZERO2 if stage == 2 else _ZERO3, user)
    ours = {"train_micro_batch_size_per_gpu": config.batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "gradient_clipping": config.max_grad_norm}
    for key, value in ours.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{config.deepspeed_config}: {key} is {ds[key]}, the training config says {value}")
    for name in ("bf16", "fp16"):
        section = dict(ds.get(name, {}))
        wanted = config.mixed_precision == name
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
        elif bool(section["enabled"]) != wanted:
            raise ConfigError(f"{config.deepspeed_config}: {name}.enabled is {section['enabled']}, "
                              f"but mixed_precision={config.mixed_precision!r}")
        ds[name] = section
    ds.setdefault("steps_per_print", 2**31 - 1)  # the loop logs itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def make_plugin(config: TrainConfig) -> Any:
    """accelerate's ``DeepSpeedPlugin`` for :func:`deepspeed_config`; a clear error when deepspeed is missing or
    the process was not started by a distributed launcher."""
    import os

    import torch.distributed as dist

    if not available():
        raise ConfigError(f"sharding={config.sharding!r} needs DeepSpeed: DS_BUILD_OPS=0 pip install 'withanyone[deepspeed]'")
    if not (dist.is_available() and dist.is_initialized()) and not {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        # otherwise DeepSpeed looks for MPI (mpi4py) and fails far from here
        raise ConfigError(f"sharding={config.sharding!r} needs a distributed launch, even for one process: "
                          "torchrun --nproc_per_node=N -m withanyone train ... (or accelerate launch)")
    if not torch.cuda.is_available():
        import shutil

        cxx = os.environ.get("CXX") or "c++"
        if shutil.which(cxx) is None:  # else DeepSpeed's comm set-up dies in a ninja traceback
            raise ConfigError(f"sharding={config.sharding!r} on CPU: DeepSpeed builds its shared-memory comm op "
                              f"(deepspeed_shm_comm) on first use and needs a C++ compiler ({cxx!r} not found; "
                              "install g++, e.g. apt-get install g++)")
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=deepspeed_config(config))


def check_engine(accelerator: Any, config: TrainConfig) -> None:
    """Refuse to train when accelerate dropped the DeepSpeed plugin (it does so silently with ``cpu=True``)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(f"sharding={config.sharding!r}: accelerate set up distributed_type "
                          f"{accelerator.distributed_type.value} instead of DeepSpeed — it drops the DeepSpeed plugin when told to use the CPU (cpu=True, "
                          "ACCELERATE_USE_CPU=1 or `accelerate launch --cpu`); launch without it")


def check_not_engine(accelerator: Any, config: TrainConfig) -> None:
    """Refuse an accelerate launch config that turned DeepSpeed on while ``sharding`` does not ask for it (its
    "auto" micro-batch size cannot be resolved without a DataLoader, and the stage would be accelerate's)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(f"the accelerate launch config enables DeepSpeed but sharding={config.sharding!r}: set "
                          "sharding=zero2 or zero3 (and deepspeed_config= for your DeepSpeed JSON) instead")


def world_and_rank(accelerator: Any) -> tuple[int, int]:
    """(world size, rank) from ``torch.distributed`` when it is initialised (under DeepSpeed on CPU accelerate
    reports 1 / 0 on every rank), else accelerate's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return accelerator.num_processes, accelerator.process_index


def is_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (``accelerator.prepare`` under a DeepSpeed plugin)."""
    if not available():
        return False
    import sys

    engine = sys.modules.get("deepspeed.runtime.engine")
    return engine is not None and isinstance(model, engine.DeepSpeedEngine)


def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """ZeRO-3 partitions gathered whole for the block (a collective; no-op for ZeRO-2's full parameters)."""
    import deepspeed

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside the ZeRO optimizer (its state is keyed by the flat fp32 partitions)."""
    return engine.optimizer.optimizer


def _flat_partitions(engine: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, the keys of the torch optimizer's state."""
    zero = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        flats = getattr(zero, attr, None)
        if flats is not None:
            return [f for f in flats if f is not None]
    raise TypeError(f"{type(zero).__name__}: not a ZeRO-2/3 optimizer this loop knows")


def gather_state(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[dict]]:
    """Full CPU weights (``engine.module``'s state-dict names, fp32 master for the trainable ones), AdamW state
    per trainable parameter name and the param groups (names for ``params``). Every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module
    params = dict(module.named_parameters())
    with _gathered(list(params.values())):
        weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    base = _base_optimizer(engine)
    per_step = next(iter(base.state.values()), {})  # the flat partition's state: moments + scalar step
    moment_keys = [k for k, v in per_step.items() if torch.is_tensor(v) and v.dim() > 0]
    scalars = {k: v.detach().cpu().clone() for k, v in per_step.items() if torch.is_tensor(v) and v.dim() == 0}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    trainable = [(n, p) for n, p in params.items() if p.requires_grad]
    for name, p in trainable:
        full = safe_get_full_fp32_param(p)
        weights[name] = full.detach().to("cpu", torch.float32).reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        state = {k: v.clone() for k, v in scalars.items()}
        for k in moment_keys:
            state[k] = safe_get_full_optimizer_state(p, k).detach().to("cpu", torch.float32).reshape(weights[name].shape)
        optim[name] = state
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}  # fp32 like the DDP path
    names = [n for n, _ in trainable]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names} for g in base.param_groups]
    return weights, optim, groups


def restore_state(engine: Any, weights: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]],
                  groups: list[dict] | None) -> None:
    """Load full weights (module and fp32 masters), AdamW state and param-group hyper-parameters (as written
    by :func:`gather_state` or the non-DeepSpeed loop) into the engine's partitions. Every rank must call it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module = engine.module
    params = dict(module.named_parameters())
    with _gathered(list(params.values()), modifier_rank=0), torch.no_grad():
        module.load_state_dict(weights)  # the compute copies (ZeRO-3: re-partitioned on leaving the block)
    trainable = [(n, p) for n, p in params.items() if p.requires_grad]
    for name, p in trainable:
        safe_set_full_fp32_param(p, weights[name].to(torch.float32))
    base = _base_optimizer(engine)
    if optim:
        first = next(iter(optim.values()))
        moment_keys = [k for k, v in first.items() if v.dim() > 0]
        if not base.state:  # torch creates the state on the first step: create it, then fill it by name
            for flat in _flat_partitions(engine):
                st: dict[str, torch.Tensor] = {k: v.clone() for k, v in first.items() if v.dim() == 0}
                st.update({k: torch.zeros_like(flat) for k in moment_keys})
                base.state[flat] = st
            link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ZeRO-1/2: point each parameter's fragment at the new state
                link()
        for name, p in trainable:
            if name not in optim:
                raise KeyError(f"no optimizer state for {name}")
            for k in moment_keys:
                safe_set_full_optimizer_state(p, optim[name][k].to(torch.float32), k)
    for group, saved in zip(base.param_groups, groups or [], strict=False):
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
