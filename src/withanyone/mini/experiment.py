"""The mini WithAnyone experiment: face model → base generator → adapter arms (``withanyone.train``) → bench.

Arms (same canvases, steps and seeds; only the references and the loss terms differ):

* ``untrained``: a freshly initialised adapter (the floor);
* ``A`` reconstruction: the reference is the ground-truth photo's own face, flow loss only;
* ``B`` the paper's recipe: references are other photos of the same person (paired), flow + GT-aligned ID
  loss + InfoNCE over in-batch faces and the extended negative pool, the release's hard gate t ≤ 0.6;
* ``C`` = B without InfoNCE (optional).

Evaluation is ``withanyone.bench.run_benchmark`` on held-out identities: each sample is a GT canvas, one
*other* photo per person as its reference and the GT boxes; generations come from ``WithAnyonePipeline``
with the mini face model as its face analyzer. Every stage writes into ``out_dir`` (weights as
safetensors) and a rerun reuses what is there.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from withanyone.errors import WithAnyoneError
from withanyone.io import atomic_write_json

from .faces import (
    MiniFaceBackend,
    embed_crops,
    face_crops,
    load_face_model,
    save_face_model,
    train_face_model,
    verification,
)
from .generator import PROMPT, canvas_batch, load_transformer, mini_pipeline, prompt_table, save_transformer, train_base
from .world import CANVAS, Canvas, box_landmarks, make_people, random_layout, render_canvas, render_portrait, split_ids

__all__ = ["MiniConfig", "QUICK", "LONG", "SMOKE", "run_experiment"]

MAX_PEOPLE = 3


@dataclass
class MiniConfig:
    """Sizes of one mini run (see :data:`QUICK`, :data:`LONG`, :data:`SMOKE`)."""

    out_dir: str = "runs/mini"
    world_seed: int = 0
    num_train_ids: int = 300
    num_heldout_ids: int = 60
    face_photos: int = 8
    face_epochs: int = 6
    det_steps: int = 800
    portraits: int = 6  # reference photos per training identity (paired references, negative pool)
    pool_canvases: int = 1500
    base_steps: int = 1500
    base_batch: int = 16
    adapter_steps: int = 300
    adapter_batch: int = 8
    adapter_lr: float = 1e-3
    lambda_id: float = 0.1
    lambda_cl: float = 0.1
    num_negatives: int = 256
    arms: tuple[str, ...] = ("A", "B")
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_samples: int = 36
    sample_steps: int = 10
    grid_samples: int = 6
    #: also evaluate from each GT noised to this level (None: only from pure noise)
    sdedit_t: float | None = 0.75
    #: noise level of the one-step denoising probe (:func:`denoise_probe`)
    probe_t: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


QUICK = MiniConfig()
LONG = MiniConfig(num_train_ids=500, num_heldout_ids=100, face_epochs=10, pool_canvases=5000, base_steps=4000,
                  adapter_steps=1500, arms=("A", "B", "C"), eval_samples=90, sample_steps=16)
SMOKE = MiniConfig(num_train_ids=120, num_heldout_ids=30, face_photos=6, face_epochs=4, det_steps=500, portraits=4,
                   pool_canvases=600, base_steps=500, adapter_steps=120, seeds=(0,), eval_samples=18, sample_steps=8,
                   grid_samples=4)


def _log(msg: str) -> None:
    print(f"[mini {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- stages
def stage_face_model(cfg: MiniConfig, out: Path) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the stand-in face model; its held-out verification."""
    path, info_path = out / "face_model.safetensors", out / "face_model.json"
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text())
    train_ids, held = split_ids(cfg.num_train_ids, cfg.num_heldout_ids)
    t0 = time.perf_counter()
    net, det = train_face_model(train_ids, cfg.world_seed, cfg.face_photos, cfg.face_epochs, cfg.det_steps, log=_log)
    thr = verification(net, train_ids[: min(60, len(train_ids))], cfg.world_seed, seed=123)["threshold"]
    held_v = verification(net, held, cfg.world_seed, seed=321, threshold=thr)
    save_face_model(path, net, det, thr)
    from .faces import detection_recall

    info = {"threshold": thr, "heldout": held_v, "detector": detection_recall(det, held, cfg.world_seed),
            "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(info_path, info)
    _log(f"face model: held-out verification {held_v['accuracy']:.3f}, same-person cos {held_v['same_mean']:.3f} "
         f"(max {held_v['same_max']:.3f}), detector count acc {info['detector']['count_accuracy']:.3f}")
    return path, info


@dataclass
class Pool:
    """Pre-rendered training canvases with their faces' embeddings, and portrait embeddings per identity."""

    canvases: list[Canvas]
    gt_emb: list[np.ndarray]  # per canvas [n, D]
    portrait_emb: dict[str, np.ndarray]  # name → [K, D]


def stage_pool(cfg: MiniConfig, net: Any) -> Pool:
    """Render the training canvases and portraits (deterministic from the world seed) and embed them."""
    train_ids, _ = split_ids(cfg.num_train_ids, cfg.num_heldout_ids)
    people = make_people(train_ids, cfg.world_seed)
    rng = np.random.default_rng(cfg.world_seed + 4242)
    canvases = canvas_batch(rng, people, cfg.pool_canvases)
    gt_emb = []
    crops = [face_crops(c.image, c.boxes) for c in canvases]
    flat = embed_crops(net, np.concatenate(crops))
    k = 0
    for c in crops:
        gt_emb.append(flat[k:k + len(c)])
        k += len(c)
    portrait_emb = {}
    for p in people:
        ims = [render_portrait(p, 7_000_000 + p.pid * 97 + j) for j in range(cfg.portraits)]
        portrait_emb[p.name] = embed_crops(net, np.stack([face_crops(c.image, c.boxes)[0] for c in ims]))
    return Pool(canvases, gt_emb, portrait_emb)


def stage_base(cfg: MiniConfig, out: Path, pool: Pool) -> tuple[Any, Any]:
    """Fit (or reuse) the patch VAE and train (or reuse) the base transformer on the pool's canvases."""
    from .generator import PatchifyVAE, to_pixels

    folder, vae_dir = out / "base", out / "vae"
    if (vae_dir / "config.json").is_file():
        vae = PatchifyVAE.from_pretrained(str(vae_dir)).eval()
    else:
        vae = PatchifyVAE().fit(to_pixels([c.image for c in pool.canvases[:1000]])).eval()
        vae.save_pretrained(str(vae_dir), safe_serialization=True)
    if (folder / "config.json").is_file():
        return load_transformer(folder), vae
    t0 = time.perf_counter()
    tf = train_base(pool.canvases, vae, cfg.base_steps, seed=cfg.world_seed, batch=cfg.base_batch, log=_log)
    save_transformer(tf, folder)
    atomic_write_json(out / "base.json", {"steps": cfg.base_steps, "seconds": round(time.perf_counter() - t0, 1)})
    return tf, vae


def adapter_batches(pool: Pool, arm: str, seed: int, batch: int, steps: int):
    """The arm's TrainBatch stream: the same canvases for every arm of a seed; A's references are the GT
    faces, B/C's are other photos (portraits) of the same people."""
    from withanyone.train.data import TrainBatch

    pick = np.random.default_rng(10_000 + seed)
    refs_rng = np.random.default_rng(20_000 + seed)
    dim = pool.gt_emb[0].shape[1]
    for step in range(steps):
        idx = pick.choice(len(pool.canvases), batch, replace=False)
        boxes = np.zeros((batch, MAX_PEOPLE, 4), np.float32)
        lms = np.zeros((batch, MAX_PEOPLE, 5, 2), np.float32)
        refs = torch.zeros(batch, MAX_PEOPLE, dim)
        gts = torch.zeros(batch, MAX_PEOPLE, dim)
        people = torch.zeros(batch, MAX_PEOPLE, dtype=torch.bool)
        names, images = [], []
        for b, i in enumerate(idx):
            c = pool.canvases[int(i)]
            images.append(c.image)
            names.append([p.name for p in c.people])
            for j, (box, p) in enumerate(zip(c.boxes, c.people, strict=True)):
                boxes[b, j] = box
                lms[b, j] = box_landmarks(box)
                people[b, j] = True
                gts[b, j] = torch.from_numpy(pool.gt_emb[int(i)][j])
                if arm == "A":
                    refs[b, j] = gts[b, j]
                else:
                    bank = pool.portrait_emb[p.name]
                    refs[b, j] = torch.from_numpy(bank[int(refs_rng.integers(len(bank)))])
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        yield TrainBatch(keys=[f"{seed}-{step}-{int(i)}" for i in idx], pixels=pixels, boxes=boxes, landmarks=lms,
                         references=refs, names=names, prompts=[PROMPT] * batch, people=people, gt_embeddings=gts)


def new_adapter(seed: int, dim: int):
    """A fresh ArcFace-branch adapter for the mini transformer."""
    from withanyone.model import WithAnyoneAdapter

    from .generator import MINI_HEADS, MINI_WIDTH

    torch.manual_seed(seed)
    return WithAnyoneAdapter(num_double_blocks=2, num_single_blocks=2, hidden_size=MINI_WIDTH, num_heads=MINI_HEADS,
                             head_dim=MINI_WIDTH // MINI_HEADS, arcface_dim=dim, use_siglip=False)


def stage_adapter(cfg: MiniConfig, out: Path, pool: Pool, transformer: Any, vae: Any, net: Any, negatives: Any, arm: str,
                  seed: int) -> Any:
    """Train (or reuse) one arm's adapter with ``withanyone.train.train``."""
    from withanyone.model import WithAnyoneAdapter
    from withanyone.train import TrainConfig, train
    from withanyone.train.loop import TrainComponents

    folder = out / "adapters" / f"{arm}-seed{seed}"
    if (folder / "final" / "config.json").is_file():
        return WithAnyoneAdapter.from_pretrained(str(folder / "final"))
    paired = arm in ("B", "C")
    config = TrainConfig(
        output_dir=str(folder), seed=seed, max_steps=cfg.adapter_steps, resume=False, save_every=cfg.adapter_steps,
        log_every=25, pretrained_model="<mini>", arcface_weights="<mini>", arcface_arch=None, resolution=CANVAS,
        batch_size=cfg.adapter_batch, mixed_precision="no", gradient_checkpointing=False, num_workers=0,
        shuffle_buffer=0, learning_rate=cfg.adapter_lr, paired_ratio=1.0 if paired else 0.0,
        lambda_id=cfg.lambda_id if paired else 0.0, lambda_cl=cfg.lambda_cl if arm == "B" else 0.0,
        num_negatives=cfg.num_negatives, id_gate="release", nce_positive="stored", t_sampling="release",
    ).validate()
    adapter = new_adapter(seed, net.embedding_dim)
    parts = TrainComponents(pipe=mini_pipeline(transformer, vae), arcface=net, adapter=adapter,
                            negative_pool=negatives if arm == "B" else None, text_table=prompt_table(cfg.world_seed))
    t0 = time.perf_counter()
    res = train(config, components=parts,
                batches=adapter_batches(pool, arm, seed, cfg.adapter_batch, cfg.adapter_steps))
    adapter.eval().requires_grad_(False)
    adapter.save_pretrained(str(folder / "final"))
    last = {k: round(float(v), 4) for k, v in res.losses.items()}
    atomic_write_json(folder / "final" / "train.json", {"losses": last, "seconds": round(time.perf_counter() - t0, 1)})
    _log(f"adapter {arm} seed {seed}: {cfg.adapter_steps} steps in {time.perf_counter() - t0:.0f}s, last {last}")
    return adapter


def write_negative_pool_file(out: Path, pool: Pool) -> Any:
    """The extended negative pool (portrait embeddings of every training identity) in the data format."""
    from withanyone.data import read_negative_pool
    from withanyone.data.shards import write_negative_pool

    path = out / "negatives.safetensors"
    ids = sorted(pool.portrait_emb)
    write_negative_pool(path, ids, [pool.portrait_emb[i] for i in ids], backend="mini")
    return read_negative_pool(path)


# ----------------------------------------------------------------------------- evaluation
def stage_heldout(cfg: MiniConfig, out: Path) -> Any:
    """The held-out benchmark on disk: GT canvases, one other photo per person, GT boxes."""
    import PIL.Image

    from withanyone.bench.samples import Benchmark, Sample

    _, held = split_ids(cfg.num_train_ids, cfg.num_heldout_ids)
    people = make_people(held, cfg.world_seed)
    root = out / "heldout"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.world_seed + 777)
    samples = []
    for k in range(cfg.eval_samples):
        n = 1 + k % MAX_PEOPLE
        who = [people[i] for i in rng.choice(len(people), n, replace=False)]
        c = render_canvas(who, random_layout(n, rng, CANVAS), int(rng.integers(1 << 30)))
        sid = f"s{k:03d}"
        gt = root / f"{sid}_gt.png"
        PIL.Image.fromarray(c.image).save(gt)
        refs = []
        for j, p in enumerate(who):
            r = render_portrait(p, int(rng.integers(1 << 30)))
            rp = root / f"{sid}_ref{j}.png"
            PIL.Image.fromarray(r.image).save(rp)
            refs.append(rp)
        samples.append(Sample(sid, PROMPT, refs, gt, [list(map(float, b)) for b in c.boxes], n,
                              meta={"people": [p.name for p in who]}))
    return Benchmark("mini-heldout", samples, root)


def generate(pipe: Any, bench: Any, folder: Path, steps: int, start_t: float | None = None) -> dict[str, Path]:
    """One output per sample (seeded by its index), through ``WithAnyonePipeline.__call__``.

    ``start_t`` None: from pure noise (the paper's setting). A number: from the sample's GT latent noised to
    that level (after the release's time shift), the sampler running the remaining steps ("SDEdit"); the
    GT's coarse layout leaks into every arm alike, the identity in the boxes still comes from the adapter.
    """
    import PIL.Image
    from diffusers import FluxPipeline

    from withanyone.pipeline.sampling import release_mu, time_shift

    from .generator import to_pixels

    folder.mkdir(parents=True, exist_ok=True)
    embeds, pooled = prompt_table()[PROMPT]
    outputs = {}
    for k, s in enumerate(bench):
        path = folder / f"{s.id}.png"
        if not path.is_file():
            extra: dict[str, Any] = {}
            if start_t is not None:
                sig = np.linspace(start_t, start_t / steps, steps)
                first = float(time_shift(release_mu(CANVAS, CANVAS), [start_t])[0])  # the scheduler's first sigma
                gt = to_pixels([np.asarray(PIL.Image.open(s.gt).convert("RGB"))])
                x0 = pipe.vae.encode(gt).latent_dist.mean * pipe.vae.config.scaling_factor
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + k))
                xt = (1 - first) * x0 + first * noise
                extra = {"latents": FluxPipeline._pack_latents(xt, 1, *x0.shape[1:]), "sigmas": list(sig)}
            try:
                img = pipe(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                           references=[str(r) for r in s.references], boxes=[tuple(b) for b in s.boxes],
                           height=CANVAS, width=CANVAS, num_inference_steps=steps, guidance_scale=1.0,
                           seed=1000 + k, output_type="np", **extra).images[0]
            except WithAnyoneError as exc:  # a reference the detector misses: this sample has no output
                _log(f"{s.id}: not generated ({exc})")
                continue
            PIL.Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)
        outputs[s.id] = path
    return outputs


def grid_image(bench: Any, outputs: dict[str, dict[str, Path]], methods: list[str], path: Path, n: int) -> Path:
    """Rows: samples; columns: references, GT, then each method's generation (GT boxes drawn)."""
    import PIL.Image
    import PIL.ImageDraw

    cell = CANVAS
    samples = [s for s in bench.samples if all(s.id in outputs[m] for m in methods)][:n]
    cols = MAX_PEOPLE + 1 + len(methods)
    head = 16
    img = PIL.Image.new("RGB", (cols * cell, head + len(samples) * cell), "white")
    draw = PIL.ImageDraw.Draw(img)
    titles = [f"ref {j + 1}" for j in range(MAX_PEOPLE)] + ["GT"] + methods
    for c, t in enumerate(titles):
        draw.text((c * cell + 4, 2), t, fill="black")
    for r, s in enumerate(samples):
        y = head + r * cell
        for j, ref in enumerate(s.references):
            img.paste(PIL.Image.open(ref).convert("RGB").resize((cell, cell)), (j * cell, y))
        tiles = [s.gt] + [outputs[m][s.id] for m in methods]
        for c, p in enumerate(tiles):
            x = (MAX_PEOPLE + c) * cell
            img.paste(PIL.Image.open(p).convert("RGB"), (x, y))
            for b in s.boxes:
                draw.rectangle([x + b[0], y + b[1], x + b[2], y + b[3]], outline=(255, 255, 255))
    img.save(path)
    return path


def denoise_probe(pipe: Any, bench: Any, net: Any, t: float = 0.5) -> dict[str, float | None]:
    """Identity in one denoising step: each held-out GT noised to ``t``, one transformer call with the
    adapter's identities (references through the pipeline's face analyzer, GT boxes), x̂₀ = x_t − t·v decoded,
    its faces cut at the GT boxes and scored with ``withanyone.bench``'s metric functions.

    The quantity the ID loss trains, measured on held-out people without the sampler or the detector in
    the way (the base generator's samples from noise are too poor for the bench to find most faces).
    """
    import PIL.Image
    from diffusers import FluxPipeline

    from withanyone.bench.metrics import score_faces
    from withanyone.bench.multi_metrics import identity_confusion

    from .generator import to_pixels

    embeds, pooled = prompt_table()[PROMPT]
    tf, vae, adapter = pipe.transformer, pipe.vae, pipe.adapter
    img_ids = FluxPipeline._prepare_latent_image_ids(1, CANVAS // 16, CANVAS // 16, "cpu", torch.float32)
    vals: dict[str, list[float]] = {"sim_gt": [], "sim_ref": [], "cp_all": [], "identity_confusion": []}
    for k, s in enumerate(bench):
        try:
            refs = pipe.prepare_identities([str(r) for r in s.references], need_crop=False)
        except WithAnyoneError:
            continue
        gt_img = np.asarray(PIL.Image.open(s.gt).convert("RGB"))
        x0 = vae.encode(to_pixels([gt_img])).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + k))
        xt = FluxPipeline._pack_latents((1 - t) * x0 + t * noise, 1, *x0.shape[1:])
        arc = torch.from_numpy(np.stack([r.arcface for r in refs]))[None].float()
        with torch.no_grad(), adapter.identities(arcface=arc, boxes=[[tuple(b) for b in s.boxes]], height=CANVAS,
                                                 width=CANVAS):
            v = tf(hidden_states=xt, timestep=torch.tensor([t]), guidance=None, pooled_projections=pooled,
                   encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=img_ids,
                   return_dict=False)[0]
            lat = FluxPipeline._unpack_latents(xt - t * v, CANVAS, CANVAS, pipe.vae_scale_factor)
            img = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0][0]
        pred = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        out_emb = embed_crops(net, face_crops(pred, s.boxes))
        gt_emb = embed_crops(net, face_crops(gt_img, s.boxes))
        ref_emb = np.stack([r.arcface for r in refs])
        sc = score_faces(out_emb, gt_emb, ref_emb, "release")
        vals["sim_gt"].append(sc.sim_gt)
        vals["sim_ref"].append(sc.sim_ref)
        if sc.cp is not None:
            vals["cp_all"].append(sc.cp)
        conf, _ = identity_confusion(out_emb, s.boxes, s.boxes, ref_emb)
        if conf is not None and len(s.boxes) > 1:
            vals["identity_confusion"].append(conf)
    return {k: (float(np.mean(v)) if v else None) for k, v in vals.items()}


METRIC_KEYS = ("sim_gt", "sim_ref", "cp", "cp_all", "count_acc", "identity_confusion")


def run_experiment(cfg: MiniConfig) -> dict[str, Any]:
    """Every stage; returns (and writes ``summary.json``) per-method and per-arm metrics."""
    from withanyone.bench.report import summarize
    from withanyone.bench.runner import FaceModelSpec, run_benchmark
    from withanyone.bench.samples import MethodOutputs
    from withanyone.faces import FaceAnalyzer

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "mini_config.json", asdict(cfg))
    timings: dict[str, float] = {}

    t = time.perf_counter()
    face_path, face_info = stage_face_model(cfg, out)
    timings["face_model"] = time.perf_counter() - t
    net, det, thr = load_face_model(face_path)
    t = time.perf_counter()
    pool = stage_pool(cfg, net)
    negatives = write_negative_pool_file(out, pool)
    timings["pool"] = time.perf_counter() - t
    _log(f"pool: {len(pool.canvases)} canvases, {len(pool.portrait_emb)} identities × {cfg.portraits} portraits "
         f"({timings['pool']:.0f}s)")
    t = time.perf_counter()
    transformer, vae = stage_base(cfg, out, pool)
    timings["base"] = time.perf_counter() - t

    bench = stage_heldout(cfg, out)
    backend = MiniFaceBackend(face_path, models=(net, det, thr))
    analyzer = FaceAnalyzer(backend)
    modes: dict[str, float | None] = {"noise": None}
    if cfg.sdedit_t is not None:
        modes[f"gt{cfg.sdedit_t:g}"] = cfg.sdedit_t
    methods: dict[str, dict[str, dict[str, Path]]] = {m: {} for m in modes}
    probes: dict[str, dict[str, float | None]] = {}
    timings["adapters"] = timings["generation"] = timings["probe"] = 0.0

    def gen_all(name: str, adapter: Any) -> None:
        t = time.perf_counter()
        pipe = mini_pipeline(transformer, vae, adapter=adapter, face_analyzer=analyzer)
        for mode, start_t in modes.items():
            methods[mode][name] = generate(pipe, bench, out / f"gen-{mode}" / name, cfg.sample_steps, start_t)
        timings["generation"] += time.perf_counter() - t
        t = time.perf_counter()
        probes[name] = denoise_probe(pipe, bench, net, cfg.probe_t)
        timings["probe"] += time.perf_counter() - t
        pipe.set_identity_adapter(None)

    for seed in cfg.seeds:
        gen_all(f"untrained-s{seed}", new_adapter(seed, net.embedding_dim).eval())
    for seed in cfg.seeds:
        for arm in cfg.arms:
            t = time.perf_counter()
            adapter = stage_adapter(cfg, out, pool, transformer, vae, net, negatives, arm, seed)
            timings["adapters"] += time.perf_counter() - t
            gen_all(f"{arm}-s{seed}", adapter)

    t = time.perf_counter()
    evals: dict[str, Any] = {}
    for mode in modes:
        run_dir = out / f"bench-{mode}"
        run_benchmark(bench, [MethodOutputs(k, v) for k, v in methods[mode].items()], run_dir,
                      face_models=[FaceModelSpec(backend=backend, gate=(thr, thr), label="mini")], progress=False)
        board = summarize(run_dir)["leaderboard"]["all"]["mini"]
        per_method = {m: {k: (board[m][k]["mean"] if board[m].get(k) else None) for k in METRIC_KEYS} for m in board}
        arms: dict[str, Any] = {}
        for arm in ("untrained", *cfg.arms):
            runs = [per_method[f"{arm}-s{s}"] for s in cfg.seeds if f"{arm}-s{s}" in per_method]
            entry = {}
            for k in METRIC_KEYS:
                vals = [r[k] for r in runs if r[k] is not None]
                entry[k] = {"mean": float(np.mean(vals)) if vals else None,
                            "spread": float(np.max(vals) - np.min(vals)) if vals else None,
                            "std": float(np.std(vals)) if vals else None, "per_seed": vals}
            arms[arm] = entry
        s0 = cfg.seeds[0]
        grid = grid_image(bench, methods[mode], [f"untrained-s{s0}", *[f"{a}-s{s0}" for a in cfg.arms]],
                          out / f"grid-{mode}.png", cfg.grid_samples)
        evals[mode] = {"arms": arms, "per_method": per_method, "grid": str(grid), "start_t": modes[mode]}
    timings["bench"] = time.perf_counter() - t
    probe_arms: dict[str, Any] = {}
    for arm in ("untrained", *cfg.arms):
        runs = [probes[f"{arm}-s{s}"] for s in cfg.seeds if f"{arm}-s{s}" in probes]
        probe_arms[arm] = {k: {"mean": float(np.mean(v)) if (v := [r[k] for r in runs if r[k] is not None]) else None,
                               "spread": float(np.ptp(v)) if v else None, "per_seed": v}
                           for k in ("sim_gt", "sim_ref", "cp_all", "identity_confusion")}
    evals["probe"] = {"arms": probe_arms, "per_method": probes, "t": cfg.probe_t}
    timings = {k: round(v, 1) for k, v in timings.items()}
    result = {"arms": evals["noise"]["arms"], "per_method": evals["noise"]["per_method"], "evals": evals,
              "face_model": face_info, "timings_s": timings, "total_s": round(time.perf_counter() - t_start, 1),
              "config": asdict(cfg)}
    atomic_write_json(out / "summary.json", result)
    return result


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON: per-arm means (from noise; then the other evaluations) and the face model's
    held-out verification accuracy."""
    short = {"sim_gt": "sim_gt", "sim_ref": "sim_ref", "cp": "cp", "cp_all": "cp_all",
             "identity_confusion": "id_confusion", "count_acc": "count_acc"}

    def means(arms: dict[str, Any]) -> dict[str, Any]:
        return {arm: {short[k]: (None if v[k]["mean"] is None else round(v[k]["mean"], 4)) for k in short if k in v}
                for arm, v in arms.items()}

    fm = result["face_model"]["heldout"]
    extra = {f"arms_{m}": means(e["arms"]) for m, e in result.get("evals", {}).items() if m != "noise"}
    return {"benchmark": "mini", "arms": means(result["arms"]), **extra,
            "face_verification_acc": round(fm["accuracy"], 4), "face_same_person_cos": round(fm["same_mean"], 4),
            "seeds": len(result["config"]["seeds"]), "total_s": result["total_s"]}
