"""``WithAnyonePipeline``: diffusers' ``FluxPipeline`` with the WithAnyone identity adapter attached.

>>> pipe = WithAnyonePipeline.from_pretrained()                      # FLUX.1-dev + WithAnyone + SigLIP
>>> out = pipe("two friends at the beach", references=["a.jpg", "b.jpg"], seed=0)
>>> out.images[0].save("out.png"); out.boxes                          # the face boxes used

Everything ``FluxPipeline`` offers keeps working (LoRA loading, ``enable_model_cpu_offload()``,
quantized transformers): the adapter hooks into the transformer's blocks, and only inside
``adapter.identities(...)`` (the span of one ``__call__``) does it change anything.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxPipeline
from diffusers.utils import BaseOutput

from .layout import Box, resolve_boxes
from .matting import DEFAULT_MATTING, matte_crop
from .references import (
    REFERENCE_DET_THRESH,
    REFERENCE_FACES,
    Reference,
    check_analyzer,
    encode_siglip,
    prepare_references,
)
from .sampling import NOISE_MODES, TIMESTEP_SHIFTS, pipeline_sigmas, release_latents

#: Default knobs of the release's inference script.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


@dataclass
class WithAnyonePipelineOutput(BaseOutput):
    """Images plus what identified them: the face boxes used, the ArcFace vectors, the seed."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    boxes: list[Box]
    arcface: torch.Tensor | None
    siglip: torch.Tensor | None
    seed: int | None
    references: list[str]


def init_identity_state(pipe: Any, adapter: Any, transformer: Any) -> None:
    """Register ``adapter`` (attached to ``transformer``) and the lazily loaded helpers' state on ``pipe``
    (shared by :class:`WithAnyonePipeline` and the Kontext pipeline)."""
    pipe.register_modules(adapter=adapter)
    if adapter is not None:
        adapter.attach(transformer)
    pipe._siglip_source = None
    pipe._siglip = None
    pipe._face_source = None
    pipe._face_analyzer = None
    pipe._matting_source = DEFAULT_MATTING
    pipe._matting_trust = None
    pipe._matting = None
    #: Where each model came from and at which revision (filled by ``from_pretrained``).
    pipe.model_sources = {}


class WithAnyonePipeline(FluxPipeline):
    """Text-to-image FLUX with 1–4 (or more) reference identities placed in face boxes.

    Components are ``FluxPipeline``'s plus ``adapter`` (a ``WithAnyoneAdapter``, attached to the transformer
    here). SigLIP and the face analyzer are not components: they load on first use, from
    ``siglip`` / ``face_analyzer`` (objects, or a loader callable), so a run with ``siglip_weight=0`` never
    loads SigLIP.
    """

    _optional_components = ["image_encoder", "feature_extractor", "adapter"]

    #: insightface detection threshold of the default face analyzer (the release's util.py: 0.4)
    face_det_thresh: float = REFERENCE_DET_THRESH

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 adapter=None, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        init_identity_state(self, adapter, transformer)

    @classmethod
    def from_pretrained(cls, base: Any = None, adapter: Any = "default", siglip: Any = "default",
                        face_pack: Any = "default", **kwargs: Any) -> WithAnyonePipeline:
        """Load FLUX (``base``), the adapter, SigLIP and the face pack from hub ids (the defaults:
        ``black-forest-labs/FLUX.1-dev``, ``WithAnyone/WithAnyone``, ``google/siglip-base-patch16-256-i18n``,
        ``antelopev2``) or local paths; a missing file raises ``ModelNotFoundError`` naming it. A folder written
        by ``save_pretrained`` brings its own adapter. ``adapter=None``
        / ``siglip=None`` leave those out; other keyword arguments (``torch_dtype``, ``local_files_only``,
        ``revision``, component overrides such as ``transformer=``) go to the loader."""
        from . import loading

        return loading.from_pretrained(
            cls, base if base is not None else loading.DEFAULT_BASE,
            adapter,
            loading.DEFAULT_SIGLIP if siglip == "default" else siglip,
            loading.DEFAULT_FACE_PACK if face_pack == "default" else face_pack, **kwargs)

    def set_identity_adapter(self, adapter: Any) -> None:
        """Use ``adapter`` (a ``WithAnyoneAdapter``, or None): detach the previous one, attach this one."""
        if self.adapter is not None and self.adapter is not adapter:
            self.adapter.detach()
        self.register_modules(adapter=adapter)
        if adapter is not None:
            adapter.attach(self.transformer)

    # ------------------------------------------------------------------ lazily loaded helpers
    def set_siglip(self, siglip: Any) -> None:
        """SigLIP for the SigLIP branch: ``(model, processor)``, a hub id / folder, or a callable
        returning ``(model, processor)``; loaded only when a call has ``siglip_weight > 0``."""
        self._siglip_source, self._siglip = siglip, None
        if isinstance(siglip, tuple):
            self._siglip = siglip

    def set_face_analyzer(self, analyzer: Any) -> None:
        """Face analyzer for reference photos and layout photos: a ``FaceAnalyzer``, an insightface pack
        (folder or name), or a callable returning one; created on first use."""
        self._face_source, self._face_analyzer = analyzer, None
        if hasattr(analyzer, "detect"):
            self._face_analyzer = analyzer

    @property
    def siglip_loaded(self) -> bool:
        """Whether the SigLIP vision tower has been loaded (it never is for ``siglip_weight=0`` calls)."""
        return self._siglip is not None

    def load_siglip(self) -> tuple[Any, Any]:
        """The SigLIP ``(vision model, image processor)``, loading it now if needed."""
        if self._siglip is None:
            src = self._siglip_source
            if src is None:
                raise ValueError("siglip_weight > 0 needs SigLIP: call pipe.set_siglip(...) or load the pipeline "
                                 "with from_pretrained(siglip=...)")
            if callable(src):
                self._siglip = tuple(src())
            else:
                from .loading import load_siglip

                self._siglip = load_siglip(src, torch_dtype=self.transformer.dtype)
        return self._siglip

    def face_analyzer(self) -> Any:
        """The face analyzer (insightface ArcFace by default, detecting at ``face_det_thresh``), creating it now
        if needed."""
        if self._face_analyzer is None:
            src = self._face_source if self._face_source is not None else "antelopev2"
            if callable(src) and not isinstance(src, str):
                self._face_analyzer = src()
            else:
                from ..faces import FaceAnalyzer

                self._face_analyzer = FaceAnalyzer("insightface", pack=str(src), det_thresh=self.face_det_thresh)
        return self._face_analyzer

    def set_matting(self, model: Any, *, trust_remote_code: bool | None = None) -> None:
        """Background-matting model for ``use_matting=True``: a segmentation model object, a hub id / folder
        (default the release's ``briaai/RMBG-2.0``; ``trust_remote_code`` defaults to True only for it), or a
        callable returning a model; loaded on the first call that needs it."""
        self._matting_source, self._matting_trust, self._matting = model, trust_remote_code, None
        if isinstance(model, torch.nn.Module):
            self._matting = model

    @property
    def matting_loaded(self) -> bool:
        """Whether the matting model has been loaded (never, unless a call had ``use_matting=True``)."""
        return self._matting is not None

    def load_matting(self) -> Any:
        """The background-matting segmentation model, loading it now if needed."""
        if self._matting is None:
            src = self._matting_source
            if callable(src) and not isinstance(src, str):
                self._matting = src()
            else:
                from .matting import load_matting

                self._matting = load_matting(src, torch_dtype=self.transformer.dtype,
                                             trust_remote_code=self._matting_trust)
        return self._matting

    # ------------------------------------------------------------------ inputs
    def check_identity_inputs(self, references: Sequence[Any] | None, boxes: Any, id_weight: float,
                              siglip_weight: float, height: int, width: int) -> None:
        """Validate the identity arguments up front; ``ValueError`` names the argument."""
        multiple = self.vae_scale_factor * 2
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v < multiple or v % multiple:
                raise ValueError(f"`{name}` must be a positive multiple of {multiple} pixels, got {v!r}")
        for name, v in (("id_weight", id_weight), ("siglip_weight", siglip_weight)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"`{name}` must be a finite number ≥ 0, got {v!r}")
        if references is None:
            if boxes is not None and not (isinstance(boxes, str) and boxes == "auto"):
                raise ValueError("`boxes` was given without `references`: boxes place reference people")
            return
        if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
            raise ValueError("`references` must be a list (one entry per person) of photos, paths or embeddings")
        if len(references) == 0:
            raise ValueError("`references` is empty; pass at least one person, or None for plain FLUX")
        if self.adapter is None:
            raise ValueError("`references` given but this pipeline has no adapter; load one with from_pretrained "
                             "or WithAnyonePipeline(..., adapter=WithAnyoneAdapter.from_pretrained(...))")
        if siglip_weight > 0 and not getattr(self.adapter.config, "use_siglip", True):
            raise ValueError("`siglip_weight` > 0 but the adapter has no SigLIP branch (use_siglip=False)")
        from .layout import _looks_like_boxes, validate_boxes

        if boxes is not None and _looks_like_boxes(boxes):
            validate_boxes(boxes, len(references), height, width)

    def prepare_identities(self, references: Sequence[Any], *, need_crop: bool,
                           reference_face: str = "score") -> list[Reference]:
        """References → :class:`Reference` records (ArcFace vector + face crop), in order."""
        dim = int(getattr(self.adapter.config, "arcface_dim", 512))
        photos = any(not isinstance(r, Reference) and not _is_vector(r) for r in references)
        analyzer = None
        if photos:
            analyzer = self.face_analyzer()
            check_analyzer(analyzer, dim)
        return prepare_references(list(references), analyzer, need_crop=need_crop, dim=dim,
                                  reference_face=reference_face)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, references: Sequence[Any] | None = None,
                 boxes: Any = None, id_weight: float = 1.0, siglip_weight: float = 0.0,
                 height: int | None = None, width: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | None = None, output_type: str = "pil", return_dict: bool = True,
                 step_callback: Callable[[int, int], None] | None = None, timestep_shift: str = "release",
                 noise: str = "release", reference_face: str = "score", use_matting: bool = False,
                 **flux_kwargs: Any):
        """Generate images of ``prompt`` showing the ``references`` in ``boxes``.

        Args:
            prompt: the text (or a list, one image batch per prompt).
            references: one entry per person: a photo (path / PIL / array), a 512-d ArcFace embedding
                (array, tensor or ``.npy`` path), a ``Face`` or a ``Reference``. ``None`` → plain FLUX.
            boxes: ``None`` / ``"auto"`` (preset placements by people count and aspect ratio, see
                ``withanyone.pipeline.layout``), a list of ``(x1, y1, x2, y2)`` pixel boxes (one per person,
                in reference order), or a layout photo whose faces give the boxes.
            id_weight: weight of the ArcFace branch (0 skips it).
            siglip_weight: weight of the SigLIP branch (0 skips it and never loads SigLIP).
            height, width: output size in pixels (multiples of 16; default 1024).
            num_inference_steps, guidance_scale: sampler steps and FLUX-dev distilled guidance.
            num_images_per_prompt: images per prompt (all with the same people and boxes).
            generator, seed: randomness; with neither, a seed is drawn and returned in the output so the
                image can be reproduced. ``seed`` builds the generator ``noise`` asks for.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            step_callback: ``f(step, total)`` after each denoising step (progress bars).
            timestep_shift: ``"release"`` (default): the release's inference time shift (μ from
                ``(W//8)·(H//8)//256`` tokens, 0.4675 at 1024²); ``"flux"``: diffusers' FluxPipeline's (μ from the
                ``(H/16)·(W/16)`` image tokens, 1.15 at 1024²). Custom ``sigmas=`` get the chosen shift too.
            noise: ``"release"`` (default): the starting noise drawn as the release draws it, on the execution
                device in the model dtype (``seed`` → ``torch.Generator(device)``), so a seed gives the release's
                picture on CUDA; a given ``generator`` draws on its own device. ``"cpu"``: ``seed`` → a CPU
                generator and FluxPipeline draws the noise (in the text encoder's dtype). On a CPU in float32
                both give the same noise.
            reference_face: which face of a reference photo is used: ``"score"`` (default, the release's: the
                detector's highest-scoring face) or ``"largest"`` (better when a small background face scores
                higher). Several faces in a photo give a warning.
            use_matting: paste each reference crop onto black through a background-matting model before SigLIP
                (the release's option; default off; model from ``set_matting``, default ``briaai/RMBG-2.0``).
                Only acts when ``siglip_weight > 0``.
            **flux_kwargs: passed to ``FluxPipeline.__call__`` (``prompt_embeds``, ``latents``, ``sigmas``, ...).
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_identity_inputs(references, boxes, id_weight, siglip_weight, height, width)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer ≥ 1, got {num_images_per_prompt!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer ≥ 1, got {num_inference_steps!r}")
        for name, value, allowed in (("timestep_shift", timestep_shift, TIMESTEP_SHIFTS),
                                     ("noise", noise, NOISE_MODES), ("reference_face", reference_face, REFERENCE_FACES)):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {', '.join(allowed)}, got {value!r}")
        if not isinstance(use_matting, bool):
            raise ValueError(f"`use_matting` must be True or False, got {use_matting!r}")
        sigmas = pipeline_sigmas(timestep_shift, height, width, num_inference_steps, self.scheduler,
                                 flux_kwargs.pop("sigmas", None))
        if sigmas is not None:
            flux_kwargs["sigmas"] = sigmas
        device = self._execution_device
        if generator is None:
            if seed is None:
                seed = secrets.randbits(31)
            generator = torch.Generator(device if noise == "release" else "cpu").manual_seed(int(seed))
        elif seed is not None:
            raise ValueError("pass either `generator` or `seed`, not both")

        if prompt is None:
            batch = flux_kwargs["prompt_embeds"].shape[0] if "prompt_embeds" in flux_kwargs else 1
        else:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        total = batch * num_images_per_prompt
        if noise == "release" and flux_kwargs.get("latents") is None:
            flux_kwargs["latents"] = release_latents(total, self.transformer.config.in_channels // 4, height, width,
                                                     generator, device, self.transformer.dtype)

        callback = flux_kwargs.pop("callback_on_step_end", None)
        if step_callback is not None:
            user_cb = callback

            def callback(pipe, i, t, kwargs):  # noqa: ANN001
                step_callback(i + 1, num_inference_steps)
                return user_cb(pipe, i, t, kwargs) if user_cb is not None else {}

        call = dict(prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                    generator=generator, output_type=output_type, return_dict=True,
                    callback_on_step_end=callback, **flux_kwargs)

        if references is None:
            out = self._base_call(**call)
            result = WithAnyonePipelineOutput(out.images, [], None, None, seed, [])
            return result if return_dict else (result.images,)

        refs = self.prepare_identities(references, need_crop=siglip_weight > 0, reference_face=reference_face)
        used_boxes = resolve_boxes(boxes, len(refs), height, width,
                                   analyzer=None if _is_box_list(boxes) else _Lazy(self.face_analyzer))
        dtype = next(self.adapter.parameters()).dtype
        arcface = torch.from_numpy(np.stack([r.arcface for r in refs]))  # [N, 512]
        siglip = None
        if siglip_weight > 0:
            model, processor = self.load_siglip()
            model_device = next(model.parameters()).device
            if model_device != device:
                model.to(device)
            crops = [r.crop for r in refs]
            if use_matting:
                matter = self.load_matting()
                matter_home = next(matter.parameters()).device
                matter.to(device)
                crops = [matte_crop(c, matter) for c in crops]
                if self._is_offloading():
                    matter.to(matter_home)
            siglip = encode_siglip(crops, model, processor).float().cpu()  # [N, T, D]
            if self._is_offloading():
                model.to("cpu")

        adapter_home = next(self.adapter.parameters()).device
        if adapter_home != device:  # under model offload the adapter rides along with the transformer's call
            self.adapter.to(device)
        try:
            with self.adapter.identities(
                arcface=arcface.to(device, dtype).unsqueeze(0).expand(total, -1, -1),
                siglip=None if siglip is None else siglip.to(device, dtype).unsqueeze(0).expand(total, -1, -1, -1),
                boxes=[list(used_boxes)] * total, height=height, width=width,
                id_weight=float(id_weight), siglip_weight=float(siglip_weight),
            ):
                out = self._base_call(**call)
        finally:
            if self._is_offloading() and adapter_home != device:
                self.adapter.to(adapter_home)
        result = WithAnyonePipelineOutput(out.images, list(used_boxes), arcface, siglip, seed,
                                          [r.source for r in refs])
        return result if return_dict else (result.images,)

    def _base_call(self, **call: Any) -> Any:
        """The base diffusers pipeline's ``__call__`` (``FluxPipeline``'s; the Kontext pipeline overrides it)."""
        return FluxPipeline.__call__(self, **call)

    def face_analyzer_spec(self) -> dict[str, Any] | None:
        """How the face analyzer in use was built (resolved pack folder, models), or None if never created."""
        backend = getattr(self._face_analyzer, "backend", None)
        return backend.spec() if backend is not None else None

    def _is_offloading(self) -> bool:
        return getattr(self, "_offload_device", None) is not None and bool(getattr(self, "_all_hooks", None))


class _Lazy:
    """A face analyzer created on first attribute access (layout photos only)."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory, self._obj = factory, None

    def __getattr__(self, name: str) -> Any:
        if self._obj is None:
            self._obj = self._factory()
        return getattr(self._obj, name)


def _is_vector(ref: Any) -> bool:
    from .references import _needs_analyzer

    return not _needs_analyzer(ref)


def _is_box_list(boxes: Any) -> bool:
    from .layout import _looks_like_boxes

    return boxes is None or (isinstance(boxes, str) and boxes == "auto") or _looks_like_boxes(boxes)
