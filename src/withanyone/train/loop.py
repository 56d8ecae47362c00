"""The training loop, nanoGPT-style: read ``train(config)`` top to bottom.

FLUX (transformer, VAE, text encoders) and the ArcFace are frozen; only the adapter's ArcFace branch
(``arcface_in_arc``, ``ipa_arc.*``) trains. One step: VAE-encode the crop → rectified-flow noising →
transformer with the adapter's identities → ``L_flow``; for images with t below the ID schedule's cut,
x̂₀ = x_t − t·v is decoded and the GT-aligned ID loss and InfoNCE are added. Multi-GPU runs go through
``accelerate launch`` / ``torchrun``: DDP, FSDP2 (``sharding="fsdp2"``) or DeepSpeed ZeRO-2/3
(``sharding="zero2"|"zero3"``, :mod:`withanyone.train.zero`), all tested on CPU processes over gloo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from withanyone.io import append_jsonl, atomic_write_json
from withanyone.train.config import ConfigError, TrainConfig
from withanyone.train.data import (
    MultiIDTrainDataset,
    TrainBatch,
    aspect_buckets,
    batch_loader,
    load_reference_bank,
)
from withanyone.train.losses import (
    flow_matching_loss,
    id_gate,
    id_loss,
    info_nce,
    noisy_latents,
    predicted_x0,
    sample_t,
)

__all__ = ["TrainComponents", "TrainResult", "load_components", "compute_losses", "train", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "trainable_parameters", "TrainingError"]

logger = logging.getLogger(__name__)

#: Adapter parameters that train, per ``branch`` (the release trains the branches separately, then merges).
BRANCH_PREFIXES = {"arc": ("arcface_in_arc.", "ipa_arc."), "sig": ("arcface_in_sig.", "siglip_in_sig.", "ipa_sig.")}
BRANCH_PREFIXES["both"] = BRANCH_PREFIXES["arc"] + BRANCH_PREFIXES["sig"]
TRAINABLE_PREFIXES = BRANCH_PREFIXES["arc"]
#: (id_weight, siglip_weight) of the identities during training, per branch
BRANCH_WEIGHTS = {"arc": (1.0, 0.0), "sig": (0.0, 1.0), "both": (1.0, 1.0)}
#: Config fields that fix the data order and step randomness; changing them on resume is allowed but inexact.
RESUME_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "train_shards", "resolution", "phase",
               "shuffle_buffer", "paired_ratio", "text_dropout", "prompt_mode", "t_sampling", "num_workers",
               "aspect_buckets")
ADAPTER_FILE = "withanyone.safetensors"
STATE_FILE = "trainer_state.safetensors"


class TrainingError(ConfigError):
    """Training cannot start or continue (no usable samples, mismatched checkpoint, wrong embedding width)."""


@dataclass
class TrainComponents:
    """Everything a step needs: a diffusers ``FluxPipeline`` (transformer, VAE, text encoders, tokenizers),
    the differentiable ArcFace, the adapter and optionally a negative pool."""

    pipe: Any
    arcface: torch.nn.Module
    adapter: Any
    negative_pool: Any = None
    text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: precomputed prompt → (T5, pooled) embeddings (``text_embeddings``); the encoders are then not needed
    text_table: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: frozen SigLIP vision tower and its image processor (``branch`` "sig" / "both")
    siglip: tuple[Any, Any] | None = None


@dataclass
class TrainResult:
    """Where a run stopped: final step, the last losses and the latest checkpoint folder."""

    step: int
    losses: dict[str, float]
    checkpoint: Path | None
    skipped: dict[str, int]
    history: list[dict[str, float]]


def trainable_parameters(adapter: torch.nn.Module, branch: str = "arc") -> list[torch.nn.Parameter]:
    """The adapter parameters that train for ``branch`` ("arc", "sig" or "both"), in a fixed order."""
    return [p for n, p in adapter.named_parameters() if n.startswith(BRANCH_PREFIXES[branch])]


def _weight_dtype(config: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


def load_components(config: TrainConfig, device: torch.device | str = "cpu") -> TrainComponents:
    """Load FLUX (``pretrained_model``), the ArcFace (``arcface_weights``), the adapter and the negative pool."""
    import diffusers
    from diffusers import FluxPipeline
    from packaging.version import Version

    from withanyone.model import WithAnyoneAdapter
    from withanyone.train.arcface import load_arcface

    dtype = _weight_dtype(config)  # frozen weights in the mixed-precision dtype; the adapter stays fp32
    dtype_key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    table = None
    no_text: dict[str, Any] = {}
    if config.text_embeddings:  # precomputed prompts: T5-XXL (≈ 9.5 GB) and CLIP stay off the GPUs
        from withanyone.train.text import load_text_embeddings

        table = load_text_embeddings(config.text_embeddings)
        no_text = {"text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}
    pipe = FluxPipeline.from_pretrained(config.pretrained_model, revision=config.revision, **{dtype_key: dtype},
                                        local_files_only=config.local_files_only, **no_text).to(device)
    arcface = load_arcface(config.arcface_weights, config.arcface_arch, device=device, dtype=torch.float32)
    siglip = None
    if config.branch != "arc":
        from withanyone.pipeline.loading import load_siglip

        model, processor = load_siglip(config.siglip_model, torch_dtype=dtype, local_files_only=config.local_files_only)
        siglip = (model.to(device).eval().requires_grad_(False), processor)
    tr = pipe.transformer.config
    if config.init_adapter:
        src = Path(config.init_adapter)
        if (src / "config.json").is_file():
            adapter = WithAnyoneAdapter.from_pretrained(str(src))
        else:
            adapter = WithAnyoneAdapter.from_authors_checkpoint(config.init_adapter, num_double_blocks=tr.num_layers)
    else:
        torch.manual_seed(config.seed)
        adapter = WithAnyoneAdapter(num_double_blocks=tr.num_layers, num_single_blocks=tr.num_single_layers,
                                    hidden_size=tr.num_attention_heads * tr.attention_head_dim,
                                    num_heads=tr.num_attention_heads, head_dim=tr.attention_head_dim,
                                    arcface_dim=arcface.embedding_dim, use_siglip=siglip is not None,
                                    siglip_dim=siglip[0].config.hidden_size if siglip is not None else 768)
    pool = None
    if config.negative_pool:
        from withanyone.data import read_negative_pool

        pool = read_negative_pool(config.negative_pool)
    adapter = adapter.to(device)
    if adapter.dtype != torch.float32:  # master weights in fp32; autocast runs the math in bf16/fp16
        adapter = adapter.to(dtype=torch.float32)
    return TrainComponents(pipe, arcface, adapter, pool, text_table=table, siglip=siglip)


def _encode_prompts(parts: TrainComponents, prompts: list[str], config: TrainConfig, device: torch.device):
    """T5 sequence and CLIP pooled embeddings per prompt (precomputed table, else the frozen encoders with a
    per-prompt cache)."""
    if parts.text_table is not None:
        missing = sorted({p for p in prompts if p not in parts.text_table})
        if missing:
            raise TrainingError(f"{config.text_embeddings}: no precomputed embedding for prompt(s) {missing[:3]}")
        return (torch.cat([parts.text_table[p][0] for p in prompts]).to(device),
                torch.cat([parts.text_table[p][1] for p in prompts]).to(device))
    cache = parts.text_cache
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    found = {p: cache[p] for p in prompts if p in cache}
    for p in missing:  # one prompt per call: its embedding does not depend on which prompts share a batch
        with torch.no_grad():
            embeds, pooled, _ = parts.pipe.encode_prompt(prompt=[p], prompt_2=None, device=device,
                                                         num_images_per_prompt=1,
                                                         max_sequence_length=config.max_sequence_length)
        found[p] = (embeds, pooled)
    if config.cache_text_embeddings:  # LRU of at most text_cache_size prompts (phase 1 has only a handful)
        for p in dict.fromkeys(prompts):
            cache.pop(p, None)
            cache[p] = found[p]
        while len(cache) > config.text_cache_size:
            cache.pop(next(iter(cache)))
    return torch.cat([found[p][0] for p in prompts]), torch.cat([found[p][1] for p in prompts])


class IdentityDenoiser(torch.nn.Module):
    """The module a distributed engine wraps (DDP, FSDP2, DeepSpeed): the adapter, driving the frozen
    transformer through its hooks inside :meth:`forward`.

    The transformer is held outside the module tree (frozen, never synchronised or sharded by the
    engine); the adapter is the only submodule, so the engine sees, syncs and shards exactly the weights
    that train, and its forward is the call that uses them.
    """

    def __init__(self, adapter: torch.nn.Module, transformer: torch.nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_transformer", transformer)

    @property
    def transformer(self) -> torch.nn.Module:
        """The frozen FLUX transformer the adapter is attached to."""
        return self._transformer

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor | None,
                pooled_projections: torch.Tensor, encoder_hidden_states: torch.Tensor, txt_ids: torch.Tensor,
                img_ids: torch.Tensor, arcface: torch.Tensor, boxes: torch.Tensor, people: torch.Tensor,
                height: int, width: int, siglip: torch.Tensor | None = None, id_weight: float = 1.0,
                siglip_weight: float = 0.0) -> torch.Tensor:
        """The transformer's velocity with the identities' residuals (packed latents in, packed out)."""
        with self.adapter.identities(arcface=arcface, siglip=siglip, boxes=boxes, people=people, height=height,
                                     width=width, id_weight=id_weight, siglip_weight=siglip_weight):
            return self._transformer(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                                     pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def compute_losses(batch: TrainBatch, parts: TrainComponents, config: TrainConfig, generator: torch.Generator,
                   t: torch.Tensor | None = None, autocast: Callable[[], Any] | None = None,
                   model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """``loss = flow + λ_id·id + λ_cl·cl`` for one batch; returns every term (0-d tensors).

    ``generator`` (CPU) draws t, the noise, the VAE posterior sample and the negatives, so a step is
    reproducible from (seed, step, slot). ``t`` overrides the sampled noise levels; ``autocast`` makes a
    fresh mixed-precision context for the VAE decode; ``model`` is the engine-wrapped
    :class:`IdentityDenoiser` (default: a bare one over ``parts``).
    """
    from diffusers import FluxPipeline

    pipe = parts.pipe
    transformer, vae = pipe.transformer, pipe.vae
    model = model if model is not None else IdentityDenoiser(parts.adapter, transformer)
    device = next(transformer.parameters()).device
    wdtype = next(vae.parameters()).dtype
    bsz, (height, width) = batch.pixels.shape[0], batch.pixels.shape[-2:]
    autocast = autocast or contextlib.nullcontext

    with torch.no_grad():
        posterior = vae.encode(batch.pixels.to(device, wdtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
        lat = posterior.mean + posterior.std * eps
        x0 = ((lat - vae.config.shift_factor) * vae.config.scaling_factor).float()
    c, h, w = x0.shape[1:]
    tokens = (h // 2) * (w // 2)  # the true image-token count sets the release's schedule shift
    t = (sample_t(config.t_sampling, bsz, tokens, generator) if t is None else t.float().cpu()).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    x_t = noisy_latents(x0, noise, t)
    packed = FluxPipeline._pack_latents(x_t, bsz, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, packed.dtype)
    embeds, pooled = _encode_prompts(parts, batch.prompts, config, device)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device)
    guidance = (torch.full((bsz,), float(config.guidance), device=device)
                if transformer.config.guidance_embeds else None)
    people = batch.mask
    id_w, sig_w = BRANCH_WEIGHTS[config.branch]
    siglip = _siglip_features(batch, parts, device) if config.branch != "arc" else None
    v = model(packed.to(wdtype), t.to(wdtype), guidance, pooled.to(wdtype), embeds.to(wdtype), txt_ids, img_ids,
              batch.references.to(device, torch.float32), torch.as_tensor(batch.boxes, dtype=torch.float64),
              people, height, width, siglip, id_w, sig_w)
    v = v.float()
    flow = flow_matching_loss(v, FluxPipeline._pack_latents(x0, bsz, c, h, w),
                              FluxPipeline._pack_latents(noise, bsz, c, h, w))
    zero = v.sum() * 0.0
    out = {"flow": flow, "id": zero, "cl": zero}

    w_img = id_gate(t.cpu(), config.id_gate, config.id_t_full, config.id_t_zero)  # [B]
    active = torch.nonzero(w_img > 0).flatten()
    total_faces = int(people.sum())
    if len(active) and total_faces and (config.lambda_id or config.lambda_cl):
        x0_hat = predicted_x0(packed, t, v)[active]
        lat_hat = FluxPipeline._unpack_latents(x0_hat, height, width, pipe.vae_scale_factor)
        lat_hat = lat_hat / vae.config.scaling_factor + vae.config.shift_factor
        with autocast():
            decoded = vae.decode(lat_hat.to(wdtype), return_dict=False)[0].float()
        if config.clamp_x0:
            decoded = decoded.clamp(-1, 1)
        pred_px = (decoded + 1) * 127.5
        gt_px = (batch.pixels[active].to(device).float() + 1) * 127.5
        act_people = people[active]  # [A, N]
        img_local, person = torch.nonzero(act_people, as_tuple=True)  # real faces of the active images
        lms = batch.landmarks[active.numpy()][img_local.numpy(), person.numpy()]
        w_face = w_img[active][img_local]
        share = len(img_local) / total_faces  # faces of gated-off images count as zero in the batch mean
        idl, q, p = id_loss(pred_px, gt_px, img_local, lms, parts.arcface, weights=w_face, return_embeddings=True)
        out["id"] = idl * share
        if config.nce_positive == "stored":
            if batch.gt_embeddings is None:
                raise TrainingError("nce_positive='stored' needs the labels' GT embeddings in the batch")
            p = batch.gt_embeddings[active][img_local, person].to(q)
        names = [batch.names[int(active[i])][int(j)] for i, j in zip(img_local.tolist(), person.tolist(), strict=True)]
        negs, mask = _negatives(p, names, parts.negative_pool, config, generator)
        out["cl"] = info_nce(q, p, negs, config.temperature, negative_mask=mask, weights=w_face) * share
    out["loss"] = out["flow"] + config.lambda_id * out["id"] + config.lambda_cl * out["cl"]
    out["id_weight"] = w_img.mean()
    return out


def _siglip_features(batch: TrainBatch, parts: TrainComponents, device: torch.device) -> torch.Tensor:
    """The frozen SigLIP tower's last hidden state of every real face's crop, [B, N, T, D] (padding: zeros)."""
    from withanyone.pipeline.references import encode_siglip

    if parts.siglip is None:
        raise TrainingError("branch 'sig'/'both' needs a SigLIP model (TrainComponents.siglip / siglip_model)")
    if batch.face_crops is None:
        raise TrainingError("branch 'sig'/'both' needs face crops in the batch (dataset siglip_crop)")
    model, processor = parts.siglip
    crops = [c for faces in batch.face_crops for c in faces]
    feats = encode_siglip(crops, model, processor).float().to(device)  # [F, T, D], no gradient
    out = feats.new_zeros(*batch.mask.shape, *feats.shape[1:])
    out[batch.mask.to(device)] = feats
    return out


def sample_pool_negatives(pool: Any, exclude: list[str], budget: int, generator: torch.Generator) -> np.ndarray:
    """``budget`` random pool embeddings of identities not in ``exclude``, gathering only those rows
    (the pool itself, 0.8 GB at 25k identities × 16, is never copied)."""
    n = len(pool.identity)
    bad = np.asarray([pool.ids.index(i) for i in set(exclude) if i in pool.ids], dtype=np.int64)
    perm = torch.randperm(n, generator=generator).numpy()
    keep = perm[~np.isin(pool.identity[perm], bad)][:budget] if len(bad) else perm[:budget]
    return np.asarray(pool.embeddings[np.sort(keep)], np.float32)


def _negatives(gt: torch.Tensor, names: list[str | None], pool: Any, config: TrainConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch GT faces (minus the query itself and its same-identity faces) + pool faces of other identities."""
    f = len(names)
    same = torch.tensor([[i == j or (a is not None and a == b) for j, b in enumerate(names)]
                         for i, a in enumerate(names)], dtype=torch.bool).reshape(f, f)
    negs, mask = [gt.detach()], [~same]
    budget = max(config.num_negatives - f, 0)
    if pool is not None and budget:
        if pool.embeddings.shape[1] != gt.shape[1]:
            raise TrainingError(f"negative pool holds {pool.embeddings.shape[1]}-d embeddings, the ArcFace gives "
                                f"{gt.shape[1]}-d")
        cand = sample_pool_negatives(pool, [n for n in names if n is not None], budget, generator)
        negs.append(torch.from_numpy(cand).to(gt))
        mask.append(torch.ones(f, len(cand), dtype=torch.bool))
    return torch.cat(negs), torch.cat(mask, 1).to(gt.device)


# ---------------------------------------------------------------------- checkpoints
def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The folder named by ``checkpoints/latest.json``, or None."""
    ptr = Path(output_dir) / "checkpoints" / "latest.json"
    if not ptr.is_file():
        return None
    folder = ptr.parent / json.loads(ptr.read_text())["dir"]
    return folder if folder.is_dir() else None


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """Full (unsharded, CPU) model and optimizer state dicts — a collective under FSDP2 and DeepSpeed, plain
    otherwise. Both in torch's full-state layout (optimizer state and groups keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from withanyone.train import zero

    if zero.is_engine(model):
        weights, state, groups = zero.gather_state(model)
        return weights, {"state": state, "param_groups": groups}

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, config: TrainConfig, extra: dict[str, Any] | None = None,
                    write: bool = True) -> Path:
    """Write ``checkpoints/step-XXXXXXX/{withanyone.safetensors, trainer_state.safetensors}`` atomically.

    ``model`` is the (engine-wrapped) :class:`IdentityDenoiser` or a bare adapter. Every rank must call
    this (gathering a sharded state is collective); only ``write=True`` writes. The adapter file is the
    authors' layout (loads with ``WithAnyoneAdapter.from_authors_checkpoint``); the state file holds the
    optimizer tensors by parameter name, the torch RNG state and, in its metadata, the step, config,
    scheduler, optimizer hyper-parameters and per-rank data positions (JSON: nothing is pickled).
    """
    from safetensors.torch import save_file

    from withanyone.model.checkpoint import save_state_dict

    msd, osd = _full_state(model, optimizer)
    root = Path(output_dir) / "checkpoints"
    name = f"step-{step:07d}"
    final = root / name
    if not write:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k.removeprefix("adapter."): v.detach().contiguous() for k, v in msd.items()}
    save_state_dict(weights, tmp / ADAPTER_FILE, metadata={"format": "pt", "source": "withanyone"})
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for pname, st in (osd or {}).get("state", {}).items():
        for k, v in st.items():
            tensors[f"optimizer.{pname}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in (osd or {}).get("param_groups", [])]
    meta = {"step": step, "config": config.to_dict(), "scheduler": scheduler.state_dict(),
            "param_groups": groups, "extra": extra or {}}
    save_file(tensors, str(tmp / STATE_FILE), metadata={"withanyone": json.dumps(meta, sort_keys=True)})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / "latest.json", {"dir": name, "step": step})
    return final


def load_checkpoint(folder: str | Path, adapter: Any, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore adapter weights (and optimizer, scheduler, torch RNG) from :func:`save_checkpoint`; returns
    the state metadata (``step``, ``config``, ``extra``). With ``model`` (the engine-wrapped
    :class:`IdentityDenoiser`) the full state is loaded into its (possibly sharded) parameters."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        weights = load_file(str(folder / ADAPTER_FILE))
        with safe_open(str(folder / STATE_FILE), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["withanyone"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingError(f"{folder}: unreadable checkpoint ({exc})") from exc
    expected = set(adapter.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise TrainingError(f"{folder}: adapter does not match the checkpoint (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})")
    from withanyone.train import zero

    state: dict[str, dict[str, torch.Tensor]] = {}  # optimizer state by parameter name
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            pname, name = k.removeprefix("optimizer.").rsplit(".", 1)
            state.setdefault(pname, {})[name] = v
    full = {f"adapter.{k}": v for k, v in weights.items()}
    if model is None:
        adapter.load_state_dict(weights)
    elif zero.is_engine(model):  # into the engine's partitions and its fp32 masters
        zero.restore_state(model, full, state if optimizer is not None else {},
                           meta["param_groups"] if optimizer is not None else None)
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, full, options=opts)
        if optimizer is not None:
            groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
            set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=opts)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return meta


def _step_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The generator of one micro-batch; ``slot = micro · world + rank`` is its place in the global batch, so
    W processes and 1 process accumulating W micro-batches draw the same numbers for the same batch."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{step}:{slot}".encode()))


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    from withanyone.train import zero

    kwargs: dict[str, Any] = {}
    if config.sharding in zero.ZERO_STAGES:
        # cpu=False even without a GPU: with cpu=True accelerate drops the DeepSpeed plugin (checked here)
        accelerator = Accelerator(mixed_precision=config.mixed_precision, deepspeed_plugin=zero.make_plugin(config),
                                  gradient_accumulation_steps=config.gradient_accumulation_steps)
        zero.check_engine(accelerator, config)
        return accelerator
    if config.sharding == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                               auto_wrap_policy="NO_WRAP",
                                                               state_dict_type="FULL_STATE_DICT")
    # without a GPU, accelerate only treats a torchrun launch as distributed (MULTI_CPU, gloo) when cpu=True
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps, **kwargs)
    zero.check_not_engine(accelerator, config)
    return accelerator


def _accelerate_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _all_true(flag: bool, accelerator: Any, world: int) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce): a rank out of data stops all ranks together."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _mean_over_ranks(values: dict[str, float], accelerator: Any, world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _usable(batch: TrainBatch, adapter: Any) -> bool:
    """Whether the adapter accepts this batch's identities (checked before any collective, so a rejected
    batch is skipped on its rank alone without desynchronising the others)."""
    from withanyone.model import IdentityInputError, InvalidBoxError

    height, width = (int(v) for v in batch.pixels.shape[-2:])
    boxes = torch.as_tensor(batch.boxes, dtype=torch.float64).clone()
    boxes[~batch.mask] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    try:
        adapter._validate(batch.references, None, boxes, height, width, 1.0, 0.0, None)
    except (IdentityInputError, InvalidBoxError) as exc:
        logger.warning("skipping batch %s: %s", batch.keys, exc)
        return False
    return True


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig, components: TrainComponents | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          batches: Iterable[TrainBatch] | None = None) -> TrainResult:
    """Train the adapter for ``config.max_steps`` optimizer steps (resuming from the latest checkpoint).

    ``batches`` replaces the shard reader with your own stream of :class:`TrainBatch` (this rank's).
    """
    config.validate()
    out = Path(config.output_dir)
    accelerator = _accelerator(config)
    from withanyone.train.zero import world_and_rank

    device, (world, rank) = accelerator.device, world_and_rank(accelerator)
    main = rank == 0  # not accelerator.is_main_process: under DeepSpeed on CPU every rank says it is
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config.to_dict())

    # --- models: FLUX and ArcFace frozen; the adapter's trainable branches wrapped by the engine
    parts = components or load_components(config, device)
    pipe, adapter = parts.pipe, parts.adapter
    towers = (parts.siglip[0],) if parts.siglip is not None else ()
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, parts.arcface, *towers):
        if module is not None:
            module.requires_grad_(False).eval()
    if config.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        if getattr(pipe.vae, "_supports_gradient_checkpointing", False):
            pipe.vae.enable_gradient_checkpointing()  # x̂₀ is decoded with gradients for the ID losses
    adapter.requires_grad_(False)
    if config.branch != "arc" and not adapter.config.use_siglip:
        raise TrainingError(f"branch={config.branch!r} but the adapter has no SigLIP branch (use_siglip=False)")
    params = trainable_parameters(adapter, config.branch)
    for p in params:
        p.requires_grad_(True)
    adapter.train().attach(pipe.transformer)
    model = IdentityDenoiser(adapter, pipe.transformer)

    # --- the engine (DDP / FSDP2) wraps the adapter; AdamW (the release: no weight decay, no warm-up)
    own_fsdp = config.sharding == "fsdp2" and world > 1 and not _accelerate_fsdp(accelerator)
    if own_fsdp:  # accelerate offers FSDP only on GPUs; on CPU processes use the same engine, torch's fully_shard
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, reshard_after_forward=True)
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if warmup <= 0 else min(1.0, (s + 1) / warmup))
    if own_fsdp:
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)

    # --- resume: weights and optimizer into the (possibly sharded) model; this rank's data position
    step = 0
    position: dict[str, Any] = {}
    base_skipped: dict[str, int] = {}
    ckpt = latest_checkpoint(out) if config.resume else None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, adapter, optimizer.optimizer, scheduler, model=model)
        step = int(meta["step"])
        extra = meta["extra"]
        changed = {k for k in RESUME_KEYS  # a key older checkpoints lack had its default then
                   if meta["config"].get(k, getattr(TrainConfig, k, None)) != getattr(config, k)}
        if extra.get("world_size", 1) != world:
            changed.add("world_size")
        if changed:  # still resumes, but the data order (hence bit-exactness) differs from an uninterrupted run
            logger.warning("resuming %s with changed %s: not an exact continuation", ckpt, ", ".join(sorted(changed)))
        else:
            position = extra.get("ranks", [{}] * world)[rank]
        base_skipped = dict(extra.get("skipped", {}))
        logger.info("resumed from %s at step %d", ckpt, step)

    # --- data: this rank's shards (webdataset splitters), batches collated in DataLoader workers
    dataset = None
    if batches is None:
        dataset, stream = _data(config, adapter, world, rank, position)
    else:
        stream = iter(batches)
        for _ in range(int(position.get("batches", 0))):
            next(stream, None)
    slots = dict(position.get("slots", {}))
    next_slot = int(position.get("next_slot", 0))
    consumed = int(position.get("batches", 0))
    rejected = 0

    def skipped_now() -> dict[str, int]:
        counts = Counter(base_skipped)
        counts.update(dataset.skip_counts() if dataset is not None else {})
        if rejected:
            counts["rejected_batch"] += rejected
        return dict(counts)

    # --- loop
    history: list[dict[str, float]] = []
    last: dict[str, float] = {}
    saved = ckpt
    trained = False
    slots_per_rank = max(config.num_workers, 1)
    try:
        while step < config.max_steps:
            sums: dict[str, float] = {}
            pending: list[TrainBatch] = []
            complete = True
            for micro in range(config.gradient_accumulation_steps):
                batch = next(stream, None)
                while batch is not None and not _usable(batch, adapter):
                    rejected += len(batch.keys)
                    pending.append(batch)
                    batch = next(stream, None)
                if not _all_true(batch is not None, accelerator, world):
                    complete = False
                    break
                pending.append(batch)
                generator = _step_generator(config.seed, step, micro * world + rank)
                with accelerator.accumulate(model):
                    losses = compute_losses(batch, parts, config, generator, autocast=accelerator.autocast, model=model)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                        sums["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / config.gradient_accumulation_steps
            if not complete:  # some rank ran out of data: every rank stops here, together, after its last whole step
                if ckpt is None and not trained:
                    raise TrainingError(f"{config.train_shards}: no usable training samples (skipped: {skipped_now()})")
                logger.info("data exhausted on some rank at step %d: all ranks stop", step)
                break
            for b in pending:  # commit this step's data positions (rejected batches included)
                consumed += 1
                if b.position is not None:
                    slot, epoch, pos = b.position
                    slots[str(slot)] = [epoch, pos] if b.pending is None else [epoch, pos, b.pending]
                    next_slot = (slot + 1) % slots_per_rank
            trained = True
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            last = {**_mean_over_ranks(sums, accelerator, world), "lr": lr, "step": step}
            history.append(last)
            if on_step is not None:
                on_step(step, last)
            if main and (step % config.log_every == 0 or step == config.max_steps):
                append_jsonl(out / "log.jsonl", {**last, "skipped": skipped_now()})
            if step % config.save_every == 0 or step == config.max_steps:
                saved = _save(out, step, model, optimizer, scheduler, config, accelerator, world, rank,
                              {"batches": consumed, "slots": slots, "next_slot": next_slot}, skipped_now())
        if trained and (saved is None or not str(saved).endswith(f"{step:07d}")):
            saved = _save(out, step, model, optimizer, scheduler, config, accelerator, world, rank,
                          {"batches": consumed, "slots": slots, "next_slot": next_slot}, skipped_now())
    finally:
        adapter.detach()
    return TrainResult(step, last, saved, skipped_now(), history)


def _save(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, config: TrainConfig, accelerator: Any,
          world: int, rank: int, position: dict[str, Any], skipped: dict[str, int]) -> Path:
    """A checkpoint with every rank's data position (gathered) and the skip counts summed over ranks."""
    ranks = _gather({**position, "step": step}, world)
    total: Counter[str] = Counter()
    for counts in _gather(skipped, world):
        total.update(counts)
    extra = {"ranks": ranks, "world_size": world, "skipped": dict(total)}
    path = save_checkpoint(out, step, model, optimizer.optimizer, scheduler, config, extra, write=rank == 0)
    if world > 1:  # torch's barrier, not accelerate's (which passes device_ids from its own, under DeepSpeed wrong, rank)
        import torch.distributed as dist

        dist.barrier()
    return path


def _data(config: TrainConfig, adapter: Any, world: int, rank: int, position: dict[str, Any]):
    """This rank's dataset and batch stream (shards split by rank and DataLoader worker)."""
    from webdataset.utils import pytorch_worker_info

    from withanyone.data.reader import _urls

    urls = _urls(config.train_shards)
    if len(urls) < world:
        raise TrainingError(f"{config.train_shards}: {len(urls)} shard(s) cannot feed {world} processes "
                            f"(shards are split by rank); write at least {world} shards")
    wds_rank, wds_world = pytorch_worker_info()[:2]
    explicit = (wds_rank, wds_world) != (rank, world)  # webdataset reads RANK/WORLD_SIZE; torchrun sets them
    refs = (load_reference_bank(config.reference_shards, seed=config.seed) if config.paired_ratio > 0 else {})
    detector = None
    if config.landmark_backend:  # the published shards carry boxes but no landmarks
        from withanyone.faces import FaceAnalyzer

        opts = {"pack": config.landmark_pack} if config.landmark_pack else {}
        detector = FaceAnalyzer(config.landmark_backend, **opts)
    start = {int(k): (int(v[0]), int(v[1])) for k, v in position.get("slots", {}).items()}
    pending = {int(k): v[2] for k, v in position.get("slots", {}).items() if len(v) > 2}  # bucket queues
    from withanyone.pipeline.references import CROP_SIZE  # generation's face crop, the SigLIP branch's input
    dataset = MultiIDTrainDataset(config.train_shards, config.resolution, max_faces=config.max_faces,
                                  embedding_dim=adapter.config.arcface_dim, prompt_mode=config.prompt_mode,
                                  text_dropout=config.text_dropout, paired_ratio=config.paired_ratio,
                                  references=refs, min_aesthetics=config.min_aesthetics, landmark_detector=detector,
                                  seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                                  rank=rank if explicit else None, world_size=world if explicit else None,
                                  epochs=config.epochs, start=start, pending=pending,
                                  buckets=aspect_buckets(config.resolution) if config.aspect_buckets else None,
                                  siglip_crop=CROP_SIZE if config.branch != "arc" else None)
    stream = batch_loader(dataset, config.batch_size, config.num_workers, int(position.get("next_slot", 0)))
    return dataset, stream
