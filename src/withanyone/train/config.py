"""Training configuration: one dataclass with the paper's defaults, phase presets, file and CLI overrides.

Precedence (lowest first): dataclass defaults → the phase preset → the config file (TOML or JSON) →
``key=value`` overrides. The phase is read first (from overrides, else the file, else 1) so that a
file or an override can still change any value the preset sets.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from withanyone.errors import WithAnyoneError

__all__ = ["TrainConfig", "ConfigError", "PHASES", "load_config", "apply_overrides"]


class ConfigError(WithAnyoneError, ValueError):
    """A training config file or override is malformed, names an unknown key, or has a bad value."""


@dataclass
class TrainConfig:
    """Every knob of :func:`withanyone.train.train`; defaults follow the paper / release (facts sheet §4)."""

    # --- run
    output_dir: str = "runs/withanyone"
    phase: int = 1
    seed: int = 0
    max_steps: int = 20_000
    resume: bool = True  # continue from output_dir/checkpoints/latest when present
    save_every: int = 1000
    log_every: int = 10
    # --- models (hub ids or local folders / files)
    pretrained_model: str = "black-forest-labs/FLUX.1-dev"
    revision: str | None = None
    local_files_only: bool = False
    arcface_weights: str = "glintr100.safetensors"  # arcface_torch r100 backbone converted to safetensors
    arcface_arch: str | None = "r100"
    branch: str = "arc"  # adapter branch that trains: "arc" (ArcFace), "sig" (SigLIP), "both"
    siglip_model: str = "google/siglip-base-patch16-256-i18n"  # frozen SigLIP vision tower (branch sig/both)
    init_adapter: str | None = None  # start from an adapter (authors' file/folder or save_pretrained folder)
    # --- data
    train_shards: str = "multiid/train_rec"  # folder of tars, one tar, or a brace pattern
    reference_shards: str | None = None  # ref/tars (phase 3 pairs)
    negative_pool: str | None = None  # negatives.safetensors (extended InfoNCE negatives)
    resolution: int = 512
    aspect_buckets: bool = False  # crop to the nearest aspect-ratio bucket (~resolution² px); batches single-bucket
    max_faces: int = 4
    landmark_backend: str | None = None  # "insightface" / "dlib": detect GT landmarks when labels lack them
    landmark_pack: str | None = None  # insightface pack (name or folder) for landmark_backend="insightface"
    min_aesthetics: float | None = None  # phase 4's curated subset: drop samples scoring below (or unscored)
    prompt_mode: str = "count"  # "count" → "n person(s)"; "caption" → the sample's caption
    text_dropout: float = 0.0  # probability of an empty prompt
    paired_ratio: float = 0.0  # probability that a sample takes its references from other photos
    shuffle_buffer: int = 256
    num_workers: int = 2  # DataLoader workers per rank (each reads its own shards: split_by_worker); 0: in-process
    epochs: int | None = None  # passes over the shards (None: endless); when one rank runs out, all stop together
    # --- optimisation (the release: batch 1 per GPU, no weight decay, no warm-up)
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # "no" | "fp16" | "bf16" (accelerate's autocast)
    gradient_checkpointing: bool = True
    sharding: str = "none"  # "none": accelerate's environment (DDP across processes); "fsdp2": shard the adapter
    # ("zero2" / "zero3": DeepSpeed ZeRO through accelerate's plugin, train/zero.py)
    deepspeed_config: str | None = None  # DeepSpeed JSON (e.g. the release's zero2_config.json) over our stage defaults
    # --- losses
    lambda_id: float = 0.1
    lambda_cl: float = 0.1
    temperature: float = 0.1
    num_negatives: int = 4096
    t_sampling: str = "release"  # "release": uniform over FLUX's 1000-point shifted schedule; "logit_normal"; "uniform"
    id_gate: str = "release"  # "release": ID terms on for t ≤ id_t_zero, off above; "ramp": linear from id_t_full
    id_t_full: float = 0.4  # (ramp) ID terms at full weight for t ≤ this …
    id_t_zero: float = 0.6  # … and zero above this
    nce_positive: str = "stored"  # "stored": the label's GT embedding (release); "recomputed": our ArcFace of the GT crop
    clamp_x0: bool = False  # clamp the decoded x̂₀ to [-1, 1] before the ID loss (the release does not)
    guidance: float = 1.0  # FLUX-dev's distilled-guidance input during training
    max_sequence_length: int = 512
    text_embeddings: str | None = None  # precomputed prompts (train.text): T5 and CLIP are then not loaded
    cache_text_embeddings: bool = True
    text_cache_size: int = 64  # prompts kept (LRU, ~4 MB each at T5 512 × 4096 bf16); count prompts always hit

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for values that cannot work; returns self."""
        checks = [
            (self.phase in PHASES, f"phase must be one of {sorted(PHASES)}, got {self.phase}"),
            (self.resolution % 16 == 0 and self.resolution >= 16, f"resolution must be a multiple of 16, got {self.resolution}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be ≥ 1"),
            (self.max_steps >= 0, "max_steps must be ≥ 0"),
            (self.prompt_mode in ("count", "caption"), f"prompt_mode must be 'count' or 'caption', got {self.prompt_mode!r}"),
            (0.0 <= self.text_dropout <= 1.0, "text_dropout must lie in [0, 1]"),
            (0.0 <= self.paired_ratio <= 1.0, "paired_ratio must lie in [0, 1]"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no/fp16/bf16, got {self.mixed_precision!r}"),
            (self.t_sampling in ("release", "logit_normal", "uniform"),
             f"t_sampling must be release, logit_normal or uniform, got {self.t_sampling!r}"),
            (self.id_gate in ("release", "ramp"), f"id_gate must be release or ramp, got {self.id_gate!r}"),
            (self.nce_positive in ("stored", "recomputed"),
             f"nce_positive must be stored or recomputed, got {self.nce_positive!r}"),
            (self.num_workers >= 0, "num_workers must be ≥ 0"),
            (self.branch in ("arc", "sig", "both"), f"branch must be arc, sig or both, got {self.branch!r}"),
            (self.sharding in ("none", "fsdp2", "zero2", "zero3"),
             f"sharding must be none, fsdp2, zero2 or zero3, got {self.sharding!r}"),
            (self.deepspeed_config is None or self.sharding in ("zero2", "zero3"),
             f"deepspeed_config is set but sharding={self.sharding!r} (use zero2 or zero3)"),
            (self.epochs is None or self.epochs >= 1, "epochs must be ≥ 1 or none"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.num_negatives >= 0, "num_negatives must be ≥ 0"),
            (1 <= self.max_faces, "max_faces must be ≥ 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)


#: Phase presets (facts sheet §4): 1 reconstruction with "n person(s)"; 2 real captions, text dropout 0.1;
#: 3 paired tuning (half the samples take references from other photos); 4 quality tuning on a curated subset.
PHASES: dict[int, dict[str, Any]] = {
    1: {"prompt_mode": "count", "text_dropout": 0.0, "paired_ratio": 0.0, "max_steps": 20_000},
    2: {"prompt_mode": "caption", "text_dropout": 0.1, "paired_ratio": 0.0, "max_steps": 40_000},
    3: {"prompt_mode": "caption", "text_dropout": 0.1, "paired_ratio": 0.5, "train_shards": "multiid/train_cp",
        "reference_shards": "multiid/ref/tars", "max_steps": 10_000},
    4: {"prompt_mode": "caption", "text_dropout": 0.1, "paired_ratio": 0.5, "train_shards": "multiid/train_cp",
        "reference_shards": "multiid/ref/tars", "min_aesthetics": 5.5, "max_steps": 2_000},
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any) -> Any:
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(_FIELDS))}")
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else False
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", "null", ""):
            return None
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        if base in (int, float):
            try:
                if base is float:
                    return float(text)
                number = float(text.replace("_", ""))
                if not number.is_integer():
                    raise ValueError(text)
                return int(number)
            except ValueError as exc:
                raise ConfigError(f"{key}: expected {base.__name__}, got {value!r}") from exc
        if base is dict or typing.get_origin(base) is dict:
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"{key}: expected a JSON object, got {value!r}") from exc
        else:
            return text
    if value is None:
        if not optional:
            raise ConfigError(f"{key}: may not be null")
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    expected = dict if typing.get_origin(base) is dict else base
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/object")
    data = dict(data.pop("train", {}), **data) if isinstance(data.get("train"), dict) else data
    return data


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def apply_overrides(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of ``config`` with ``values`` (strings are parsed by the field's type) applied."""
    return dataclasses.replace(config, **{k: _coerce(k, v) for k, v in values.items()})


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults → phase preset → file (TOML/JSON, keys at top level or under ``[train]``) → overrides."""
    file_values = _read_file(path) if path is not None else {}
    over = _parse_overrides(overrides)
    phase = _coerce("phase", over.get("phase", file_values.get("phase", 1)))
    if phase not in PHASES:
        raise ConfigError(f"phase must be one of {sorted(PHASES)}, got {phase}")
    cfg = apply_overrides(TrainConfig(phase=phase), PHASES[phase])
    cfg = apply_overrides(cfg, file_values)
    cfg = apply_overrides(cfg, over)
    return cfg.validate()
