"""The training loop, nanoGPT-style: read ``train(config)`` top to bottom.

FLUX (transformer, VAE, text encoders) and the ArcFace are frozen; only the adapter's ArcFace branch
(``arcface_in_arc``, ``ipa_arc.*``) trains. One step: VAE-encode the crop → rectified-flow noising →
transformer with the adapter's identities → ``L_flow``; for images with t below the ID schedule's cut,
x̂₀ = x_t − t·v is decoded and the GT-aligned ID loss and InfoNCE are added. Multi-GPU runs go through
``accelerate launch`` (DDP / FSDP / DeepSpeed configs are accelerate's; untested here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from withanyone.io import append_jsonl, atomic_write_json
from withanyone.train.config import ConfigError, TrainConfig
from withanyone.train.data import MultiIDTrainDataset, TrainBatch, iter_batches, load_reference_bank
from withanyone.train.losses import (
    flow_matching_loss,
    id_loss,
    id_weight_schedule,
    info_nce,
    noisy_latents,
    predicted_x0,
)

__all__ = ["TrainComponents", "TrainResult", "load_components", "compute_losses", "train", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "trainable_parameters", "TrainingError"]

logger = logging.getLogger(__name__)

#: Adapter parameters that train (the ArcFace branch; the SigLIP branch is trained separately in the paper).
TRAINABLE_PREFIXES = ("arcface_in_arc.", "ipa_arc.")
#: Config fields that fix the data order and step randomness; changing them on resume is allowed but inexact.
RESUME_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "train_shards", "resolution", "phase",
               "shuffle_buffer", "paired_ratio", "text_dropout", "prompt_mode", "timestep_sampling")
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


@dataclass
class TrainResult:
    """Where a run stopped: final step, the last losses and the latest checkpoint folder."""

    step: int
    losses: dict[str, float]
    checkpoint: Path | None
    skipped: dict[str, int]
    history: list[dict[str, float]]


def trainable_parameters(adapter: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters that train (ArcFace branch), in a fixed order."""
    return [p for n, p in adapter.named_parameters() if n.startswith(TRAINABLE_PREFIXES)]


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
    pipe = FluxPipeline.from_pretrained(config.pretrained_model, revision=config.revision, **{dtype_key: dtype},
                                        local_files_only=config.local_files_only).to(device)
    arcface = load_arcface(config.arcface_weights, config.arcface_arch, device=device, dtype=torch.float32)
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
                                    arcface_dim=arcface.embedding_dim, use_siglip=False)
    pool = None
    if config.negative_pool:
        from withanyone.data import read_negative_pool

        pool = read_negative_pool(config.negative_pool)
    adapter = adapter.to(device)
    if adapter.dtype != torch.float32:  # master weights in fp32; autocast runs the math in bf16/fp16
        adapter = adapter.to(dtype=torch.float32)
    return TrainComponents(pipe, arcface, adapter, pool)


def _encode_prompts(parts: TrainComponents, prompts: list[str], config: TrainConfig, device: torch.device):
    """T5 sequence and CLIP pooled embeddings per prompt (frozen encoders; cached per prompt string)."""
    cache = parts.text_cache
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    found = {p: cache[p] for p in prompts if p in cache}
    if missing:
        with torch.no_grad():
            embeds, pooled, _ = parts.pipe.encode_prompt(prompt=missing, prompt_2=None, device=device,
                                                         num_images_per_prompt=1,
                                                         max_sequence_length=config.max_sequence_length)
        found.update({p: (embeds[i:i + 1], pooled[i:i + 1]) for i, p in enumerate(missing)})
    if config.cache_text_embeddings:  # LRU of at most text_cache_size prompts (phase 1 has only a handful)
        for p in dict.fromkeys(prompts):
            cache.pop(p, None)
            cache[p] = found[p]
        while len(cache) > config.text_cache_size:
            cache.pop(next(iter(cache)))
    return torch.cat([found[p][0] for p in prompts]), torch.cat([found[p][1] for p in prompts])


def _sample_t(config: TrainConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    if config.timestep_sampling == "uniform":
        return torch.rand(batch, generator=generator)
    return torch.sigmoid(torch.randn(batch, generator=generator))


def compute_losses(batch: TrainBatch, parts: TrainComponents, config: TrainConfig, generator: torch.Generator,
                   t: torch.Tensor | None = None,
                   autocast: Callable[[], Any] | None = None) -> dict[str, torch.Tensor]:
    """``loss = flow + λ_id·id + λ_cl·cl`` for one batch; returns every term (0-d tensors).

    ``generator`` (CPU) draws t, the noise and the VAE posterior sample, so a step is reproducible from
    (seed, step). ``t`` overrides the sampled noise levels; ``autocast`` makes a fresh mixed-precision
    context (e.g. ``accelerator.autocast``) for the transformer and VAE-decode calls.
    """
    from diffusers import FluxPipeline

    pipe, adapter = parts.pipe, parts.adapter
    transformer, vae = pipe.transformer, pipe.vae
    device = next(transformer.parameters()).device
    wdtype = next(vae.parameters()).dtype
    bsz, res = batch.pixels.shape[0], batch.pixels.shape[-1]
    autocast = autocast or contextlib.nullcontext

    with torch.no_grad():
        posterior = vae.encode(batch.pixels.to(device, wdtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
        lat = posterior.mean + posterior.std * eps
        x0 = ((lat - vae.config.shift_factor) * vae.config.scaling_factor).float()
    t = (_sample_t(config, bsz, generator) if t is None else t.float().cpu()).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    x_t = noisy_latents(x0, noise, t)
    c, h, w = x0.shape[1:]
    packed = FluxPipeline._pack_latents(x_t, bsz, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, packed.dtype)
    embeds, pooled = _encode_prompts(parts, batch.prompts, config, device)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device)
    guidance = (torch.full((bsz,), float(config.guidance), device=device)
                if transformer.config.guidance_embeds else None)
    boxes = [[list(map(float, b)) for b in item] for item in batch.boxes]
    with adapter.identities(arcface=batch.references.to(device, torch.float32), boxes=boxes, height=res, width=res,
                            id_weight=1.0), autocast():
        v = transformer(hidden_states=packed.to(wdtype), timestep=t.to(wdtype), guidance=guidance,
                        pooled_projections=pooled.to(wdtype), encoder_hidden_states=embeds.to(wdtype),
                        txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    v = v.float()
    flow = flow_matching_loss(v, FluxPipeline._pack_latents(x0, bsz, c, h, w),
                              FluxPipeline._pack_latents(noise, bsz, c, h, w))
    zero = v.sum() * 0.0
    out = {"flow": flow, "id": zero, "cl": zero}

    w_img = id_weight_schedule(t.cpu(), config.id_t_full, config.id_t_zero)  # [B]
    n_people = batch.num_people
    active = torch.nonzero(w_img > 0).flatten()
    if len(active) and (config.lambda_id or config.lambda_cl):
        x0_hat = predicted_x0(packed, t, v)[active]
        lat_hat = FluxPipeline._unpack_latents(x0_hat, res, res, pipe.vae_scale_factor)
        lat_hat = lat_hat / vae.config.scaling_factor + vae.config.shift_factor
        with autocast():
            decoded = vae.decode(lat_hat.to(wdtype), return_dict=False)[0]
        pred_px = (decoded.float().clamp(-1, 1) + 1) * 127.5
        gt_px = (batch.pixels[active.cpu()].to(device).float() + 1) * 127.5
        image_index = torch.arange(len(active)).repeat_interleave(n_people)
        lms = batch.landmarks[active.cpu().numpy()].reshape(-1, 5, 2)
        w_face = w_img[active.cpu()].repeat_interleave(n_people)
        share = len(image_index) / (bsz * n_people)  # inactive faces count as zero in the batch mean
        idl, q, p = id_loss(pred_px, gt_px, image_index, lms, parts.arcface, weights=w_face, return_embeddings=True)
        out["id"] = idl * share
        names = [batch.names[i][j] for i in active.tolist() for j in range(n_people)]
        negs, mask = _negatives(p, names, parts.negative_pool, config, generator)
        out["cl"] = info_nce(q, p, negs, config.temperature, negative_mask=mask, weights=w_face) * share
    out["loss"] = out["flow"] + config.lambda_id * out["id"] + config.lambda_cl * out["cl"]
    out["id_weight"] = w_img.mean()
    return out


def _negatives(gt: torch.Tensor, names: list[str | None], pool: Any, config: TrainConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch GT faces (minus the query itself and its same-identity faces) + pool faces of other identities."""
    f = len(names)
    same = torch.tensor([[i == j or (a is not None and a == b) for j, b in enumerate(names)]
                         for i, a in enumerate(names)], dtype=torch.bool).reshape(f, f)
    negs, mask = [gt.detach()], [~same]
    budget = max(config.num_negatives - f, 0)
    if pool is not None and budget:
        cand = pool.negatives_for([n for n in names if n is not None])
        if cand.shape[1] != gt.shape[1]:
            raise TrainingError(f"negative pool holds {cand.shape[1]}-d embeddings, the ArcFace gives {gt.shape[1]}-d")
        if len(cand) > budget:
            cand = cand[torch.randperm(len(cand), generator=generator)[:budget].numpy()]
        negs.append(torch.from_numpy(np.ascontiguousarray(cand)).to(gt))
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


def save_checkpoint(output_dir: str | Path, step: int, adapter: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, config: TrainConfig, extra: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step-XXXXXXX/{withanyone.safetensors, trainer_state.safetensors}`` atomically.

    The adapter file is the authors' layout (loads with ``WithAnyoneAdapter.from_authors_checkpoint``);
    the state file holds optimizer tensors, the torch RNG state and, in its metadata, the step, config,
    scheduler and optimizer hyper-parameters (JSON: nothing is pickled).
    """
    from safetensors.torch import save_file

    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = root / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapter.save_authors_checkpoint(tmp / ADAPTER_FILE)
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optimizer.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {"step": step, "config": config.to_dict(), "scheduler": scheduler.state_dict(),
            "param_groups": opt["param_groups"], "extra": extra or {}}
    save_file(tensors, str(tmp / STATE_FILE), metadata={"withanyone": json.dumps(meta, sort_keys=True)})
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / "latest.json", {"dir": name, "step": step})
    return final


def load_checkpoint(folder: str | Path, adapter: Any, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore adapter weights (and optimizer, scheduler, torch RNG) from :func:`save_checkpoint`; returns
    the state metadata (``step``, ``config``, ``extra``)."""
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
    missing, unexpected = adapter.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise TrainingError(f"{folder}: adapter does not match the checkpoint (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]})")
    if optimizer is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return meta


class _Counted:
    """An iterator that counts what it handed out (batches consumed, for exact resume)."""

    def __init__(self, it: Any):
        self.it, self.count = it, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.count += 1
        return item


def _next_losses(batches: Any, dataset: MultiIDTrainDataset, parts: TrainComponents, config: TrainConfig,
                 generator: torch.Generator, autocast: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """Losses of the next batch; a batch the adapter rejects (boxes, identities) is counted and skipped."""
    from withanyone.model import IdentityInputError, InvalidBoxError

    while True:
        batch = next(batches, None)
        if batch is None:
            raise TrainingError(f"{config.train_shards}: no usable training samples (skipped: {dict(dataset.skipped)})")
        try:
            return compute_losses(batch, parts, config, generator, autocast=autocast)
        except (IdentityInputError, InvalidBoxError) as exc:
            logger.warning("skipping batch %s: %s", batch.keys, exc)
            dataset.skipped["rejected_batch"] += len(batch.keys)


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over processes (the adapter runs through hooks, not a DDP-wrapped forward)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _step_generator(seed: int, step: int, micro: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{step}:{micro}:{rank}".encode()))


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig, components: TrainComponents | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train the adapter for ``config.max_steps`` optimizer steps (resuming from the latest checkpoint)."""
    from accelerate import Accelerator

    config.validate()
    out = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    device = accelerator.device
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config.to_dict())

    # --- models: FLUX and ArcFace frozen, the adapter's ArcFace branch trains
    parts = components or load_components(config, device)
    pipe, adapter = parts.pipe, parts.adapter
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, parts.arcface):
        if module is not None:
            module.requires_grad_(False).eval()
    if config.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        if getattr(pipe.vae, "_supports_gradient_checkpointing", False):
            pipe.vae.enable_gradient_checkpointing()  # x̂₀ is decoded with gradients for the ID losses
    adapter.requires_grad_(False)
    params = trainable_parameters(adapter)
    for p in params:
        p.requires_grad_(True)
    adapter.train().attach(pipe.transformer)

    # --- optimizer: AdamW with linear warm-up
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    optimizer = accelerator.prepare(optimizer)

    # --- resume
    step = consumed = 0
    ckpt = latest_checkpoint(out) if config.resume else None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, adapter, optimizer.optimizer, scheduler)
        step = int(meta["step"])
        consumed = int(meta["extra"].get("consumed_batches", step * config.gradient_accumulation_steps))
        logger.info("resumed from %s at step %d", ckpt, step)
        changed = {k for k in RESUME_KEYS if meta["config"].get(k) != getattr(config, k)}
        if changed:  # still resumes, but the data order (hence bit-exactness) differs from an uninterrupted run
            logger.warning("resuming %s with changed %s: not an exact continuation", ckpt, ", ".join(sorted(changed)))

    # --- data: a seeded stream; resuming replays and drops the batches already consumed
    refs = (load_reference_bank(config.reference_shards, seed=config.seed) if config.paired_ratio > 0 else {})
    detector = None
    if config.landmark_backend:  # the published shards carry boxes but no landmarks
        from withanyone.faces import FaceAnalyzer

        opts = {"pack": config.landmark_pack} if config.landmark_pack else {}
        detector = FaceAnalyzer(config.landmark_backend, **opts)
    dataset = MultiIDTrainDataset(config.train_shards, config.resolution, max_faces=config.max_faces,
                                  embedding_dim=adapter.config.arcface_dim, prompt_mode=config.prompt_mode,
                                  text_dropout=config.text_dropout, paired_ratio=config.paired_ratio,
                                  references=refs, min_aesthetics=config.min_aesthetics, landmark_detector=detector,
                                  seed=config.seed,
                                  shuffle_buffer=config.shuffle_buffer, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes)
    batches = _Counted(iter_batches(dataset, config.batch_size))
    for _ in range(consumed):
        next(batches, None)

    # --- loop
    history: list[dict[str, float]] = []
    last: dict[str, float] = {}
    saved = ckpt
    try:
        while step < config.max_steps:
            sums: dict[str, float] = {}
            for micro in range(config.gradient_accumulation_steps):
                generator = _step_generator(config.seed, step, micro, accelerator.process_index)
                with accelerator.accumulate(adapter):
                    losses = _next_losses(batches, dataset, parts, config, generator, accelerator.autocast)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients:
                        _all_reduce_grads(params, accelerator.num_processes)
                        sums["grad_norm"] = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / config.gradient_accumulation_steps
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            last = {**sums, "lr": lr, "step": step}
            history.append(last)
            if on_step is not None:
                on_step(step, last)
            if accelerator.is_main_process and (step % config.log_every == 0 or step == config.max_steps):
                append_jsonl(out / "log.jsonl", {**last, "skipped": dict(dataset.skipped)})
            if step % config.save_every == 0 or step == config.max_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    saved = save_checkpoint(out, step, adapter, optimizer.optimizer, scheduler, config,
                                            {"skipped": dict(dataset.skipped), "consumed_batches": batches.count})
    finally:
        adapter.detach()
    return TrainResult(step, last, saved, dict(dataset.skipped), history)
