"""``bench generate``: a method's outputs for every benchmark sample, resumable, scaled out on Ray Data.

The method is ``withanyone`` (our :class:`~withanyone.pipeline.WithAnyonePipeline`; ``tiny=True`` uses the tiny
random pipeline so the loop runs offline) or any Python callable named ``module:callable`` — see
:class:`GenerationSample` for the contract. Per sample the output ``<out>/<id>.png`` and its sidecar
``<out>/<id>.json`` (prompt, references, boxes, size, seed, sha256 of the image) are written atomically,
image first; a sample counts as done only when its sidecar says ``ok`` and the image's sha256 matches, so a
torn or foreign file is regenerated. The folder is the method-output layout ``bench run -m NAME=DIR`` reads.

Seeds are fixed per sample (``sample_seed(base, id)``) so a killed run resumed, or the same samples split
over any number of workers, gives byte-identical images. With ``workers`` > 1, ``num_gpus`` > 0 or a Ray
``address`` the samples go through ``ray.data`` ``map_batches`` with one actor per device (per CPU worker),
each loading the method once; each actor appends a line to ``generate.log.jsonl`` per sample it finished.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WithAnyoneError
from ..io import append_jsonl, atomic_write_bytes, atomic_write_json
from .samples import Benchmark, Sample

log = logging.getLogger(__name__)

#: ``--layout``: the benchmark's boxes (GT faces; MultiHuman-Testbench's pose heads) or our automatic layout.
LAYOUTS = ("prior", "auto")
#: Per-sample generation log (one line per finished sample, from whichever worker made it).
LOG = "generate.log.jsonl"
#: Subset names accepted by ``--subset`` (``p34`` is the release's name for three or four people).
SUBSET_ALIASES = {"p1": "p1", "p2": "p2", "p3": "p3", "p34": "p3"}
#: Object store for a local Ray started here (the generation actors pass only small rows).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


class GenerationError(WithAnyoneError, ValueError):
    """A generation setting or method cannot be used; the message names it and says why."""


@dataclass
class GenerationSample:
    """What a method's callable receives for one benchmark sample (the callable contract).

    A method is ``f(sample: GenerationSample) -> PIL.Image.Image``. It must generate ``prompt`` showing the
    people of ``references`` (paths, one photo per person, in order), optionally placing person ``k`` in
    ``boxes[k]`` (``x1, y1, x2, y2`` pixels of an image ``width`` × ``height``; None when the benchmark has
    none) and must draw all randomness from ``seed``, so the same sample gives the same image. Any image
    size is accepted (it is scored as returned). ``gt`` (the ground-truth photo) is given only for
    calibration methods (oracles); a real method must not look at it. A class named as the method is
    instantiated once per worker (load weights in ``__init__``) and its instances are called per sample.
    """

    id: str
    prompt: str
    references: list[str]
    boxes: list[list[float]] | None
    height: int
    width: int
    seed: int
    num_persons: int
    subset: str
    gt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def sample_seed(base: int, sample_id: str) -> int:
    """The fixed seed of one sample: the first 31 bits of ``sha256(f"{base}:{id}")``."""
    return int.from_bytes(hashlib.sha256(f"{int(base)}:{sample_id}".encode()).digest()[:4], "big") >> 1


def output_size(gt_size: tuple[int, int] | None, long_side: int, multiple: int = 16) -> tuple[int, int]:
    """``(width, height)``: the GT's aspect ratio with the longer side ``long_side``, each rounded to a multiple
    of ``multiple`` (≥ one multiple); square when the GT size is unknown."""
    if not gt_size or min(gt_size) <= 0:
        return long_side, long_side
    w, h = gt_size
    scale = long_side / max(w, h)

    def r(v: float) -> int:
        return max(multiple, int(round(v * scale / multiple)) * multiple)

    return r(w), r(h)


def rescale_boxes(boxes: Sequence[Sequence[float]] | None, gt_size: tuple[int, int] | None,
                  size: tuple[int, int]) -> list[list[float]] | None:
    """GT face boxes (GT pixels) → the output's pixels (``size`` = width, height), clipped to the image; None
    when there are no boxes or the GT size is unknown."""
    if not boxes or not gt_size or min(gt_size) <= 0:
        return None
    sx, sy = size[0] / gt_size[0], size[1] / gt_size[1]
    out = []
    for b in boxes:
        if not isinstance(b, (list, tuple)) or len(b) != 4:
            return None
        x1, y1, x2, y2 = (float(v) for v in b)
        nb = [min(max(x1 * sx, 0.0), size[0]), min(max(y1 * sy, 0.0), size[1]),
              min(max(x2 * sx, 0.0), size[0]), min(max(y2 * sy, 0.0), size[1])]
        if nb[2] - nb[0] < 1 or nb[3] - nb[1] < 1:
            return None
        out.append([round(v, 2) for v in nb])
    return out


def _image_size(path: Path | None) -> tuple[int, int] | None:
    if path is None or not path.is_file():
        return None
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).size
    except Exception:  # an unreadable GT: the sample is generated without boxes, the run reports the GT
        return None


def _prior_size(sample: Sample) -> tuple[int, int] | None:
    """The size a sample's boxes refer to when it has no GT: MultiHuman-Testbench's pose image (``pose_size``)."""
    size = sample.meta.get("pose_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return None


def select_samples(bench: Benchmark, subset: str | None = None, limit: int | None = None) -> list[Sample]:
    """The benchmark's samples of ``subset`` (p1, p2, p3 or p34; simple or complex for MultiHuman-Testbench),
    the first ``limit`` of them."""
    samples = list(bench)
    if subset in ("simple", "complex"):  # MultiHuman-Testbench's splits
        samples = [s for s in samples if s.meta.get("split") == subset]
    elif subset:
        if subset not in SUBSET_ALIASES:
            raise GenerationError(f"--subset {subset!r}: expected one of {', '.join(SUBSET_ALIASES)}")
        samples = [s for s in samples if s.subset == SUBSET_ALIASES[subset]]
    if limit is not None:
        samples = samples[:max(0, int(limit))]
    return samples


def make_requests(samples: Sequence[Sample], *, long_side: int = 1024, height: int | None = None,
                  width: int | None = None, seed: int = 0, layout: str = "prior") -> list[GenerationSample]:
    """One :class:`GenerationSample` per sample: size (``width``/``height``, or the GT's aspect ratio at
    ``long_side``), the GT boxes rescaled to it, the sample's fixed seed.

    ``layout``: ``prior`` gives the benchmark's boxes (MultiID-Bench: the GT's faces; MultiHuman-Testbench:
    the pose image's heads, whose size then sets the aspect ratio); ``auto`` gives none (the pipeline's
    automatic layout — MultiHuman-Testbench's "in the wild" task)."""
    if layout not in LAYOUTS:
        raise GenerationError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    reqs = []
    for s in samples:
        gt_size = _image_size(s.gt) or _prior_size(s)
        size = (width, height) if width and height else output_size(gt_size, long_side)
        reqs.append(GenerationSample(
            id=s.id, prompt=s.prompt, references=[str(p) for p in s.references],
            boxes=rescale_boxes(s.boxes, gt_size, size) if layout == "prior" else None,
            height=int(size[1]), width=int(size[0]),
            seed=sample_seed(seed, s.id), num_persons=s.num_persons, subset=s.subset,
            gt=str(s.gt) if s.gt else None,
            meta={k: v for k, v in s.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}))
    return reqs


# ------------------------------------------------------------------------------------------------ methods


@dataclass
class MethodSpec:
    """How to build the method in a worker: ``withanyone`` (our pipeline) or ``module:callable``.

    ``steps``/``guidance``/``id_weight``/``siglip_weight`` apply to ``withanyone``; ``tiny`` swaps in the tiny
    random pipeline; ``pretrained`` holds ``WithAnyonePipeline.from_pretrained`` keyword arguments.
    """

    pipeline: str = "withanyone"
    tiny: bool = False
    steps: int | None = None
    guidance: float = 4.0
    id_weight: float = 1.0
    siglip_weight: float = 0.0
    device: str | None = None
    pretrained: dict[str, Any] = field(default_factory=dict)
    #: Memory settings (``withanyone.pipeline.memory``): ``low_vram``, ``base_quantization``,
    #: ``adapter_quantization``, ``text_encoder_quantization``, ``offload``, ``transformer_file``.
    memory: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What produced the images (for the sidecars)."""
        if self.pipeline == "withanyone":
            return {"pipeline": "withanyone", "tiny": self.tiny, "steps": self.num_steps, "guidance": self.guidance,
                    "id_weight": self.id_weight, "siglip_weight": self.siglip_weight,
                    **({"pretrained": self.pretrained} if self.pretrained else {}),
                    **({"memory": self.memory} if self.memory else {})}
        return {"pipeline": self.pipeline}

    @property
    def num_steps(self) -> int:
        """Sampler steps (2 for the tiny pipeline, the release's 25 otherwise, unless set)."""
        return int(self.steps if self.steps is not None else (2 if self.tiny else 25))

    def load(self) -> Callable[[GenerationSample], Any]:
        """Build the method (in the worker that will call it)."""
        if self.pipeline == "withanyone":
            return PipelineMethod(self)
        return load_callable(self.pipeline)


def load_callable(spec: str, instantiate: bool = True) -> Callable[[GenerationSample], Any]:
    """``module:callable`` → the callable (a class is instantiated once, unless ``instantiate`` is False:
    checking a name must not load a model); a clear error when it is not one."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise GenerationError(f"--pipeline {spec!r}: expected 'withanyone' or 'module:callable'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise GenerationError(f"--pipeline {spec!r}: cannot import module {mod_name!r} ({exc})") from exc
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GenerationError(f"--pipeline {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        return obj() if instantiate else obj
    if not callable(obj):
        raise GenerationError(f"--pipeline {spec!r}: {attr!r} is not callable")
    return obj


class PipelineMethod:
    """Our ``WithAnyonePipeline`` as a method: loaded once, called per sample with the sample's seed."""

    def __init__(self, spec: MethodSpec):
        import torch

        from ..pipeline import memory

        self.spec = spec
        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        settings = dict(spec.memory)
        transformer_file = settings.pop("transformer_file", None)
        mem = memory.resolve_memory(settings.pop("low_vram", None), **settings)
        if spec.tiny:
            from ..pipeline.tiny import tiny_pipeline

            self.pipe = tiny_pipeline()
            memory.apply_memory(self.pipe, mem, device, compute_dtype=torch.float32, quantize_base=True,
                                transformer_file=transformer_file)
        else:
            from ..pipeline import WithAnyonePipeline

            self.pipe = WithAnyonePipeline.from_pretrained(**spec.pretrained, low_vram=mem,
                                                           transformer_file=transformer_file, device=device)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, sample: GenerationSample) -> Any:
        """One image for ``sample``."""
        out = self.pipe(sample.prompt, references=sample.references, boxes=sample.boxes or "auto",
                        height=sample.height, width=sample.width, num_inference_steps=self.spec.num_steps,
                        guidance_scale=self.spec.guidance, id_weight=self.spec.id_weight,
                        siglip_weight=self.spec.siglip_weight, seed=sample.seed,
                        max_sequence_length=16 if self.spec.tiny else 512)
        return out.images[0]


# ------------------------------------------------------------------------------------------ files and state


def image_path(out: Path, sample_id: str) -> Path:
    """Where a sample's output image goes."""
    return out / f"{sample_id}.png"


def sidecar_path(out: Path, sample_id: str) -> Path:
    """Where a sample's JSON sidecar goes."""
    return out / f"{sample_id}.json"


def read_sidecar(out: Path, sample_id: str) -> dict[str, Any] | None:
    """The sample's sidecar, or None when it is missing or unreadable (torn by a killed run)."""
    try:
        meta = json.loads(sidecar_path(out, sample_id).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def is_done(out: Path, sample_id: str) -> bool:
    """True when the sidecar says ``ok`` and the image on disk has the sha256 it records (whatever the
    settings it was made with; :func:`settings_differ` tells whether those are this run's)."""
    img = image_path(out, sample_id)
    meta = read_sidecar(out, sample_id)
    if meta is None or not img.is_file():
        return False
    return meta.get("status") == "ok" and meta.get("sha256") == hashlib.sha256(img.read_bytes()).hexdigest()


def reference_digests(req: GenerationSample) -> list[str | None]:
    """sha256 of each reference photo of ``req`` (None = missing): the sidecar records the references by
    content, so a moved benchmark folder is not regenerated while a replaced photo is."""
    from ..io import sha256_file

    out: list[str | None] = []
    for r in req.references:
        try:
            out.append(sha256_file(r))
        except OSError:
            out.append(None)
    return out


def settings_differ(side: dict[str, Any], req: GenerationSample, describe: dict[str, Any],
                    refs_sha256: list[str | None]) -> list[str]:
    """The generation settings in which a sidecar differs from this run's request (empty: the same).

    Compared: the seed, prompt, references (by content when the sidecar records it, else by path), boxes,
    output size, number of people and every setting of the generator (pipeline, steps, guidance, …)."""
    diff = []
    if side.get("seed") != req.seed:
        diff.append("seed")
    if side.get("prompt") != req.prompt:
        diff.append("prompt")
    old_refs = side.get("references_sha256")
    if (old_refs != refs_sha256) if old_refs is not None else (side.get("references") != req.references):
        diff.append("references")
    if side.get("boxes") != req.boxes:
        diff.append("boxes")
    if (side.get("width"), side.get("height")) != (req.width, req.height):
        diff.append("size")
    if side.get("num_persons") != req.num_persons:
        diff.append("num_persons")
    gen = side.get("generator") if isinstance(side.get("generator"), dict) else {}
    diff += [k for k in sorted(set(gen) | set(describe)) if gen.get(k) != describe.get(k)]
    return diff


def remove_stale_temporaries(out: Path) -> int:
    """Delete ``.*.tmp`` files left by a killed run's atomic writes; returns how many."""
    n = 0
    for p in out.glob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def encode_png(image: Any) -> bytes:
    """PNG bytes of a method's output (a PIL image, or an H×W×3 uint8 array); TypeError for anything else."""
    import numpy as np
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise TypeError(f"method returned an array of shape {image.shape} / {image.dtype}, "
                            "expected H×W×3 uint8 or a PIL image")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"method returned {type(image).__name__}, expected a PIL.Image.Image")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def generate_one(method: Callable[[GenerationSample], Any], req: GenerationSample, out: Path, method_name: str,
                 describe: dict[str, Any], orphaned: Callable[[], bool] | None = None,
                 refs_sha256: list[str | None] | None = None) -> dict[str, Any]:
    """Generate, write image then sidecar atomically, log; returns a status row (never raises for the sample).

    ``orphaned()`` is asked before anything is written: a worker whose run was killed exits there instead of
    writing a sample the next run may be generating too."""
    t0, wall0 = time.perf_counter(), time.time()
    side = {"sample": req.id, "method": method_name, "status": "ok", "error": None, "image": None, "sha256": None,
            "seed": req.seed, "prompt": req.prompt, "references": req.references, "boxes": req.boxes,
            "height": req.height, "width": req.width, "num_persons": req.num_persons, "subset": req.subset,
            "generator": describe,
            "references_sha256": refs_sha256 if refs_sha256 is not None else reference_digests(req)}
    try:
        data = encode_png(method(req))
    except Exception as exc:  # one bad sample never kills the run: recorded, retried by the next run
        side.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        data = None
    if orphaned is not None and orphaned():
        os._exit(1)
    if data is not None:
        atomic_write_bytes(image_path(out, req.id), data)
        side.update(image=image_path(out, req.id).name, sha256=hashlib.sha256(data).hexdigest())
    else:  # an image left from an earlier run would be scored as this run's output
        image_path(out, req.id).unlink(missing_ok=True)
    atomic_write_json(sidecar_path(out, req.id), side)  # written last: it marks the sample done
    seconds = time.perf_counter() - t0
    append_jsonl(out / LOG, {"sample": req.id, "status": side["status"], "pid": os.getpid(),
                             "seconds": round(seconds, 4), "t0": wall0, "t1": time.time(), "error": side["error"]})
    return {"sample": req.id, "status": side["status"], "error": side["error"] or "", "seconds": seconds}


class _GenerationActor:
    """Ray Data actor: loads the method once, generates the samples of each batch."""

    def __init__(self, spec: dict[str, Any], out: str, method_name: str, threads: int = 0):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.spec = MethodSpec(**spec)
        self.method = self.spec.load()
        self.describe = self.spec.describe()
        self.out = Path(out)
        self.method_name = method_name
        self.parent = os.getppid()  # the raylet; it dies with a killed run, and this worker is re-parented

    def orphaned(self) -> bool:
        """True once the process that started this worker is gone (its run was killed)."""
        return os.getppid() != self.parent

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: dict[str, list] = {"sample": [], "status": [], "error": [], "seconds": []}
        for text in batch["request"]:
            req = GenerationSample(**json.loads(str(text)))
            if self.orphaned():
                os._exit(1)
            r = generate_one(self.method, req, self.out, self.method_name, self.describe, self.orphaned)
            for k in rows:
                rows[k].append(r[k])
        return rows


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class GenerateStats:
    """What a generation run did: samples generated / skipped / failed, seconds, workers, engine."""

    generated: int = 0
    skipped: int = 0
    failed: int = 0
    #: done outputs made with other settings than this run's, generated again; per differing setting
    regenerated: int = 0
    regenerate_reasons: dict[str, int] = field(default_factory=dict)
    #: outputs in the folder outside this run's selection whose seed or generator differ from this run's
    other_settings_kept: int = 0
    seconds: float = 0.0
    workers: int = 1
    engine: str = "local"
    failures: dict[str, str] = field(default_factory=dict)


def _ensure_ray(address: str | None, num_cpus: int, num_gpus: int) -> bool:
    """Start Ray unless running already; returns whether we started it (and must shut it down)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        if address:
            import withanyone

            ray.init(address=address, log_to_driver=False,
                     runtime_env={"py_modules": [str(Path(withanyone.__file__).parent)]})
        else:  # workers import the same withanyone as this process (a source checkout wins over an install)
            import withanyone

            src = str(Path(withanyone.__file__).resolve().parents[1])
            path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
            from ..raysession import start_local_ray

            start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus or None, include_dashboard=False,
                            log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                            logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": path}})
        started = True
    else:
        started = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return started


def generate(bench: Benchmark, out_dir: str | Path, method_name: str, spec: MethodSpec | None = None, *,
             subset: str | None = None, limit: int | None = None, seed: int = 0, long_side: int = 1024,
             height: int | None = None, width: int | None = None, workers: int = 1, num_gpus: int = 0,
             address: str | None = None, engine: str = "auto", progress: bool = True,
             layout: str = "prior") -> GenerateStats:
    """Generate ``method_name``'s output for every selected sample into ``out_dir``; resumable.

    ``engine``: ``"auto"`` (Ray Data when ``workers`` > 1, ``num_gpus`` > 0 or ``address`` is set, else in this
    process), ``"ray"`` or ``"local"``. With Ray there is one actor per GPU (``num_gpus``), else ``workers``
    CPU actors of one thread each; every actor loads the method once. ``layout``: see :func:`make_requests`.
    """
    from ..progress import track

    spec = spec or MethodSpec()
    if spec.pipeline != "withanyone":
        load_callable(spec.pipeline, instantiate=False)  # fail fast, here, with a clear message
    if engine not in ("auto", "ray", "local"):
        raise GenerationError(f"engine {engine!r}: expected auto, ray or local")
    if not method_name or "/" in method_name:
        raise GenerationError(f"method name must be non-empty and contain no '/': {method_name!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GenerationError(f"--out {out} is a file, not a folder (outputs need a folder)")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    reqs = make_requests(select_samples(bench, subset, limit), long_side=long_side, height=height, width=width,
                         seed=seed, layout=layout)
    describe = spec.describe()
    todo: list[GenerationSample] = []
    reasons: Counter[str] = Counter()
    regenerated = 0
    refs_sha = {r.id: reference_digests(r) for r in reqs}
    for r in reqs:
        if not is_done(out, r.id):
            todo.append(r)
            continue
        diff = settings_differ(read_sidecar(out, r.id) or {}, r, describe, refs_sha[r.id])
        if diff:  # made with other settings: never kept as done; removed now, so the folder never mixes
            reasons.update(diff)
            regenerated += 1
            image_path(out, r.id).unlink(missing_ok=True)
            sidecar_path(out, r.id).unlink(missing_ok=True)
            todo.append(r)
    chosen = {r.id for r in reqs}
    kept = 0
    for side_file in out.glob("*.json"):
        if side_file.stem in chosen or side_file.name == "generate.json":
            continue
        side = read_sidecar(out, side_file.stem)
        if side and side.get("status") == "ok" and (side.get("generator") != describe
                                                     or side.get("seed") != sample_seed(seed, side_file.stem)):
            kept += 1
    if regenerated:
        why = ", ".join(f"{k}: {v}" for k, v in reasons.most_common())
        log.warning("%d output(s) in %s were made with other settings than this run's (%s): generating them "
                    "again", regenerated, out, why)
    use_ray = engine == "ray" or (engine == "auto" and (workers > 1 or num_gpus > 0 or bool(address)))
    n_actors = max(1, num_gpus if num_gpus > 0 else workers)
    stats = GenerateStats(skipped=len(reqs) - len(todo), workers=n_actors if use_ray else 1,
                          engine="ray" if use_ray else "local", regenerated=regenerated,
                          regenerate_reasons=dict(reasons.most_common()), other_settings_kept=kept)
    atomic_write_json(out / "generate.json", {"benchmark": bench.name, "method": method_name,
                                              "generator": spec.describe(), "seed": seed, "subset": subset,
                                              "limit": limit, "samples": [r.id for r in reqs]})
    if todo and use_ray:
        rows = _run_ray(todo, out, method_name, spec, n_actors, num_gpus, address)
    elif todo:
        method = spec.load()
        rows = (generate_one(method, r, out, method_name, describe, refs_sha256=refs_sha[r.id]) for r in todo)
    else:
        rows = iter(())
    for row in track(rows, total=len(todo), description=f"generate {method_name}", enabled=progress):
        if row["status"] == "ok":
            stats.generated += 1
        else:
            stats.failed += 1
            stats.failures[str(row["sample"])] = str(row["error"])
    stats.seconds = time.perf_counter() - t0
    return stats


def _run_ray(todo: list[GenerationSample], out: Path, method_name: str, spec: MethodSpec, n_actors: int,
             num_gpus: int, address: str | None):
    import ray
    import ray.data

    started = _ensure_ray(address, n_actors, num_gpus)
    try:
        items = [{"request": json.dumps(r.to_dict())} for r in todo]
        kwargs = {"spec": asdict(spec), "out": str(out.resolve()), "method_name": method_name,
                  "threads": 0 if num_gpus > 0 else 1}
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _GenerationActor, fn_constructor_kwargs=kwargs, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(n_actors, len(items))),
            num_gpus=1 if num_gpus > 0 else 0, num_cpus=0 if num_gpus > 0 else 1)
        yield from ds.iter_rows()
    finally:
        if started:
            from ..raysession import shutdown_ray

            shutdown_ray()
