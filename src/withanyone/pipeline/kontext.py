"""``WithAnyoneKontextPipeline``: diffusers' ``FluxKontextPipeline`` with the WithAnyone adapter (K and Ke).

>>> pipe = WithAnyoneKontextPipeline.from_pretrained(variant="Ke")    # FLUX.1-Kontext-dev + WithAnyone.Ke
>>> out = pipe("", image="team.jpg", references=["alice.jpg"], replace=[1], seed=0)
>>> out.images[0].save("edited.png"); out.edit.boxes                    # the box the new face went into

Two modes. **Edit** (``image=`` given, WithAnyone.Ke, the release's ``gradio_edit.py``): the photo's faces are
detected, the photo is made square around them (512²), the faces are blurred, and Kontext redraws the photo with
the references' identities in the replaced faces' boxes (:mod:`withanyone.pipeline.edit`). **Text-to-image**
(no ``image``, WithAnyone.K): as :class:`~withanyone.pipeline.WithAnyonePipeline`, on the Kontext base.

In both, Kontext's sequence is ``[target tokens, condition tokens]``; the adapter's residual touches only the
first ``(H/16)·(W/16)`` (target) tokens, as the release's ``real_img_len`` slice does. The identity call itself is
``WithAnyonePipeline.__call__`` (same seeds, release time shift, references, boxes) with Kontext's ``__call__``
as its base call.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxKontextPipeline

from .edit import EDIT_DET_THRESH, RELEASE_BLUR_MIN_FACE, RELEASE_BLUR_RADIUS, RELEASE_SIZE, EditPlan, prepare_edit
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, WithAnyonePipeline, WithAnyonePipelineOutput, init_identity_state

__all__ = ["EDIT_DET_THRESH", "EDIT_SIGLIP_REFUSAL", "WithAnyoneKontextPipeline", "WithAnyoneKontextPipelineOutput"]

#: Why SigLIP is refused in edit mode.
EDIT_SIGLIP_REFUSAL = (
    "siglip_weight > 0 is not supported for Kontext edits: the release's edit model (WithAnyone.Ke, "
    "withanyone_kontext_e) runs ArcFace-only (gradio_edit.py passes arc_only=True, 'only arcface supported now'); "
    "use siglip_weight=0")


# Methods shared with WithAnyonePipeline verbatim (they touch only the identity state set by init_identity_state).
_SHARED = ("set_identity_adapter", "set_siglip", "set_face_analyzer", "siglip_loaded", "load_siglip",
           "set_matting", "matting_loaded", "load_matting", "check_identity_inputs",
           "prepare_identities", "face_analyzer_spec", "_is_offloading", "face_analyzer")


@dataclass
class WithAnyoneKontextPipelineOutput(WithAnyonePipelineOutput):
    """``WithAnyonePipelineOutput`` plus the edit's plan (condition image, boxes, replaced faces), or None."""

    edit: EditPlan | None = None


class WithAnyoneKontextPipeline(FluxKontextPipeline):
    """FLUX.1 Kontext with reference identities: edit a photo's faces (Ke) or generate from text (K)."""

    _optional_components = ["image_encoder", "feature_extractor", "adapter"]
    #: the default analyzer detects at the release's edit threshold (gradio_edit.py's ``prepare(ctx_id=0)``)
    face_det_thresh: float = EDIT_DET_THRESH

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 adapter=None, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        init_identity_state(self, adapter, transformer)
        #: "K" (text-to-image) or "Ke" (edit): which release checkpoint the adapter is, when known.
        self.kontext_variant: str | None = getattr(adapter, "kontext_variant", None)

    @classmethod
    def from_pretrained(cls, base: Any = None, adapter: Any = "default", variant: str = "Ke",
                        adapter_file: str | None = None, siglip: Any = "default", face_pack: Any = "default",
                        **kwargs: Any) -> WithAnyoneKontextPipeline:
        """Load FLUX.1-Kontext-dev (``base``, a diffusers folder or hub id) and the K or Ke adapter (``adapter``:
        a hub repo — default ``WithAnyone/WithAnyone`` —, a folder or a ``.safetensors`` file, in the FLUX or the
        Kontext-edit key layout; ``adapter_file`` names the file, default
        :data:`withanyone.model.kontext.KONTEXT_FILES` [variant]). The adapter is located (a missing file fails
        in one line naming it) and loaded before the base. ``siglip`` defaults to the release's SigLIP for K and
        to none for Ke (ArcFace-only). Other keyword arguments as ``WithAnyonePipeline.from_pretrained``."""
        from ..model import WithAnyoneAdapter
        from ..model.checkpoint import AUTHORS_REPO
        from ..model.kontext import KONTEXT_BASE, KONTEXT_VARIANTS, load_kontext_adapter
        from . import loading

        if variant not in KONTEXT_VARIANTS:
            raise ValueError(f"`variant` must be one of {', '.join(KONTEXT_VARIANTS)}, got {variant!r}")
        base = base if base is not None else KONTEXT_BASE
        if adapter == "default":
            local = Path(str(base)).expanduser()
            index = local / "model_index.json"
            if not (index.is_file() and (local / "adapter" / "config.json").is_file()):
                adapter = AUTHORS_REPO
        if adapter is not None and adapter != "default" and not isinstance(adapter, WithAnyoneAdapter):
            path = Path(str(adapter)).expanduser()
            if not (path.is_dir() and (path / "config.json").is_file() and adapter_file is None):
                adapter = load_kontext_adapter(
                    adapter, variant, adapter_file, torch_dtype=kwargs.get("torch_dtype") or torch.bfloat16,
                    local_files_only=bool(kwargs.get("local_files_only")), revision=kwargs.get("revision"),
                    num_double_blocks=_double_blocks(base, kwargs))
        if siglip == "default":
            siglip = loading.DEFAULT_SIGLIP if variant == "K" else None
        pipe = loading.from_pretrained(cls, base, adapter, siglip,
                                       loading.DEFAULT_FACE_PACK if face_pack == "default" else face_pack, **kwargs)
        pipe.kontext_variant = variant
        return pipe


    def _base_call(self, **call: Any) -> Any:
        """FluxKontextPipeline's ``__call__`` (the shared identity body's base call)."""
        return FluxKontextPipeline.__call__(self, **call)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: Any = None,
                 references: Sequence[Any] | None = None, boxes: Any = None, replace: Sequence[int] | int | None = None,
                 id_weight: float = 1.0, siglip_weight: float = 0.0, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, seed: int | None = None,
                 output_type: str = "pil", return_dict: bool = True,
                 step_callback: Callable[[int, int], None] | None = None, timestep_shift: str = "release",
                 noise: str = "release", reference_face: str = "score", canvas: str = "square",
                 size: int = RELEASE_SIZE, keep_unreplaced: bool = False, feather: float = 0.0,
                 blur_radius: float = RELEASE_BLUR_RADIUS, min_blur_face: float = RELEASE_BLUR_MIN_FACE,
                 face_order: str = "left",
                 crop_rng: random.Random | None = None, use_matting: bool = False, **kontext_kwargs: Any):
        """Edit ``image``'s faces into the ``references`` (edit mode), or generate ``prompt`` with them (no image).

        Args:
            prompt: the text (the release's edit demo defaults to an empty prompt).
            image: the base photo (path / PIL / array) → edit mode; ``None`` → text-to-image mode.
            references: one entry per new person, as in ``WithAnyonePipeline`` (photo, ArcFace vector, ``Face``).
            boxes: edit mode: ``None`` / ``"faces"`` (the replaced faces' boxes) or a list of ``(x1, y1, x2, y2)``
                canvas-pixel boxes, one per reference, overriding them. Text-to-image: as ``WithAnyonePipeline``
                (``None``/``"auto"`` presets, a box list, or a layout photo).
            replace: edit mode: the face indices (left to right, see ``face_order``) the references replace, in
                reference order; default every detected face (then one reference per face, as the release).
            id_weight: ArcFace branch weight. siglip_weight: SigLIP branch weight (text-to-image with an adapter
                that has the branch, e.g. K; refused in edit mode: the release's edit is ArcFace-only).
            height, width: text-to-image output size (default 1024²); in edit mode the canvas decides them.
            num_inference_steps, guidance_scale: the release's 25 steps and guidance 4 by default.
            num_images_per_prompt, generator, seed, output_type, return_dict, step_callback, timestep_shift, noise,
                reference_face, use_matting: as ``WithAnyonePipeline`` (seeds drawn on the device, the release's
                time shift with μ from ``(W//8)·(H//8)//256``).
            canvas: ``"square"`` (default, the release's square crop around the faces, ``size``²) or ``"photo"``
                (ours: the whole photo at diffusers' nearest Kontext aspect, ~``size``² pixels).
            size: canvas side (square) or √area (photo), a multiple of 16; the release's 512 by default.
            keep_unreplaced: ours: leave faces that are not replaced unblurred (release: every face blurred).
            feather: ours: soft edge of the blur mask, px (release: 0, a hard paste).
            blur_radius: Gaussian radius of the face blur (the release's 15).
            min_blur_face: faces with a side under this many photo px stay unblurred (the release's 100).
            face_order: face numbering, ``"left"`` (left to right) or ``"detector"``.
            crop_rng: a ``random.Random`` to draw the square crop's start as the release does (default: the middle
                of the window holding every face).
            **kontext_kwargs: passed to ``FluxKontextPipeline.__call__`` (``prompt_embeds``, ``latents``, …).
        """
        if image is None:
            height = height or self.default_sample_size * self.vae_scale_factor
            width = width or self.default_sample_size * self.vae_scale_factor
            kontext_kwargs.setdefault("max_area", int(height) * int(width))  # Kontext would rescale to 1 MP
            result = WithAnyonePipeline.__call__(
                self, prompt, references=references, boxes=boxes, id_weight=id_weight, siglip_weight=siglip_weight,
                height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed, output_type=output_type,
                return_dict=True, step_callback=step_callback, timestep_shift=timestep_shift, noise=noise,
                reference_face=reference_face, use_matting=use_matting, **kontext_kwargs)
            out = WithAnyoneKontextPipelineOutput(**_fields(result))
            return out if return_dict else (out.images,)

        if siglip_weight:
            raise ValueError(EDIT_SIGLIP_REFUSAL)
        if references is None or isinstance(references, (str, bytes, os.PathLike)) or len(references) == 0:
            raise ValueError("an edit needs `references`: a list with one new person per replaced face")
        if self.adapter is None:
            raise ValueError("an edit needs the identity adapter (WithAnyone.Ke); load it with from_pretrained")
        plan = prepare_edit(image, references, _LazyAnalyzer(self.face_analyzer), replace=replace, boxes=boxes,
                            canvas=canvas, keep_unreplaced=keep_unreplaced, feather=feather, size=size,
                            blur_radius=blur_radius, min_blur_face=min_blur_face, rng=crop_rng,
                            order=face_order)
        w, h = plan.size
        if (height is not None and height != h) or (width is not None and width != w):
            raise ValueError(f"edit mode generates at the canvas size {w}×{h}; set `size`/`canvas`, not height/width")
        kontext_kwargs.update(image=plan.condition, max_area=w * h, _auto_resize=False)
        result = WithAnyonePipeline.__call__(
            self, prompt if prompt is not None else "", references=references, boxes=[tuple(b) for b in plan.boxes],
            id_weight=id_weight, siglip_weight=0.0, height=h, width=w, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator,
            seed=seed, output_type=output_type, return_dict=True, step_callback=step_callback,
            timestep_shift=timestep_shift, noise=noise, reference_face=reference_face, **kontext_kwargs)
        out = WithAnyoneKontextPipelineOutput(**_fields(result), edit=plan)
        return out if return_dict else (out.images,)


for _name in _SHARED:
    setattr(WithAnyoneKontextPipeline, _name, WithAnyonePipeline.__dict__[_name])
del _name


def _double_blocks(base: Any, kwargs: dict[str, Any]) -> int | None:
    """The base transformer's double-block count (where the release's flat adapter block list splits), read from
    a ``transformer=`` override or the base's ``transformer/config.json``; None (→ FLUX's 19 + 38) if unknown."""
    given = kwargs.get("transformer")
    if given is not None:
        return len(given.transformer_blocks)
    import json

    from .sources import _Source

    try:
        src = _Source(base, kwargs.get("revision"), kwargs.get("local_files_only"), "FLUX.1 Kontext base")
        return int(json.loads(src.file("transformer/config.json").read_text())["num_layers"])
    except Exception:  # the base's own check (after the adapter) reports a missing base precisely
        return None


def _fields(result: WithAnyonePipelineOutput) -> dict[str, Any]:
    return {k: getattr(result, k) for k in ("images", "boxes", "arcface", "siglip", "seed", "references")}


class _LazyAnalyzer:
    """The pipeline's face analyzer, created on first ``detect`` (not at all when faces are given)."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory, self._obj = factory, None

    def detect(self, *args: Any, **kwargs: Any) -> Any:
        if self._obj is None:
            self._obj = self._factory()
        return self._obj.detect(*args, **kwargs)
