"""Photo filters: face count 1–5, minimum face size, sharpness; aesthetics/captions only where a model loads."""

from __future__ import annotations

from dataclasses import dataclass

from .faces_stage import FaceRecord, PhotoRecord


@dataclass(frozen=True)
class FilterConfig:
    """Limits: faces per photo, smallest face side kept (px), least variance of the Laplacian (112² crop)."""

    min_faces: int = 1
    max_faces: int = 5
    min_face_size: float = 48.0
    min_sharpness: float = 30.0


@dataclass
class FilterResult:
    """Faces kept (indices into the photo's detections), faces dropped as too small, and the rejection."""

    kept: list[int]
    small: int
    reason: str | None

    @property
    def ok(self) -> bool:
        """True when the photo passes every filter."""
        return self.reason is None


def filter_photo(photo: PhotoRecord, cfg: FilterConfig) -> FilterResult:
    """Apply the filters to one photo.

    Faces smaller than ``min_face_size`` are dropped from the labels (background faces, false detections).
    The photo is then rejected with a reason: ``unreadable`` (could not be read), ``no_face``,
    ``too_many_faces`` (more than ``max_faces``) or ``blurry`` (a kept face under ``min_sharpness``).
    """
    if photo.error is not None:
        return FilterResult([], 0, "unreadable")
    kept = [i for i, f in enumerate(photo.faces) if f.size >= cfg.min_face_size]
    small = len(photo.faces) - len(kept)
    if len(kept) < cfg.min_faces:
        return FilterResult(kept, small, "no_face")
    if len(kept) > cfg.max_faces:
        return FilterResult(kept, small, "too_many_faces")
    if any(photo.faces[i].sharpness < cfg.min_sharpness for i in kept):
        return FilterResult(kept, small, "blurry")
    return FilterResult(kept, small, None)


def is_single_person(photo: PhotoRecord, result: FilterResult) -> bool:
    """A photo that may join the reference bank: passes the filters and shows exactly one face."""
    return result.ok and len(result.kept) == 1 and photo.item.search_name is not None


def largest(faces: list[FaceRecord]) -> FaceRecord:
    """The face with the longest short side."""
    return max(faces, key=lambda f: f.size)


def optional_models() -> dict[str, str]:
    """Status of the optional aesthetics and caption stages: ``"skipped: <why>"`` when their model is absent.

    Both need weights from the hub (aesthetic-predictor v2.5 on SigLIP, a captioning VLM); they are not
    bundled with any package, so offline builds report them as skipped and write ``null`` scores/captions.
    """
    status = {}
    for stage, repo in (("aesthetics", "discus0434/aesthetic-predictor-v2-5"),
                        ("captions", "a captioning VLM (e.g. Qwen2.5-VL)")):
        status[stage] = f"skipped: model {repo} not available offline"
    return status
