"""``FaceAnalyzer``: one front over interchangeable face backends, single images or batches."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ImageLoadError
from .align import align_face
from .backends.base import FaceBackend
from .image import ImageInput, describe_source, load_image
from .types import Face

#: Names accepted by ``FaceAnalyzer(backend=...)``.
BACKENDS = ("dlib", "insightface")


def create_backend(backend: str = "dlib", **options: Any) -> FaceBackend:
    """Instantiate a backend by name: ``"dlib"`` (default, offline) or ``"insightface"`` (ONNX pack;
    pass ``pack=`` a folder, a name under ``~/.insightface/models`` or a hub id)."""
    if backend == "dlib":
        from .backends.dlib_backend import DlibBackend

        return DlibBackend(**options)
    if backend in ("insightface", "onnx", "antelopev2", "buffalo_l"):
        from .backends.insightface_backend import InsightFaceBackend

        if backend in ("antelopev2", "buffalo_l"):
            options.setdefault("pack", backend)
        return InsightFaceBackend(**options)
    raise ValueError(f"unknown face backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class ImageFaces:
    """Faces found in one image of a batch, or the reason the image could not be read."""

    source: str
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def ok(self) -> bool:
        """True when the image was read (it may still hold no face)."""
        return self.error is None


class FaceAnalyzer:
    """Detect, align and embed faces with one backend.

    >>> fa = FaceAnalyzer()                       # dlib, offline
    >>> faces = fa.detect("photo.jpg")            # list[Face], largest first, with embeddings
    """

    def __init__(self, backend: str | FaceBackend = "dlib", **options: Any):
        self.backend: FaceBackend = backend if isinstance(backend, FaceBackend) else create_backend(backend, **options)
        #: Number of images passed through the detector / faces through the embedder (cost accounting).
        self.calls = {"detect": 0, "embed": 0}
        self._pool: Any = None
        self._pool_size = 0

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool, self._pool_size = None, 0

    def __enter__(self) -> FaceAnalyzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pool"], state["_pool_size"] = None, 0
        return state

    def start_workers(self, workers: int) -> None:
        """Start (or resize to) ``workers`` processes, each holding its own models; they stay up for later
        batches until :meth:`close`, so repeated batches pay the start-up once."""
        if self._pool is not None and self._pool_size == workers:
            return
        self.close()
        ctx = mp.get_context("spawn")  # fork is unsafe once torch/ray threads exist in the parent
        self._pool = ctx.Pool(workers, initializer=_worker_init, initargs=(self.backend.spec(),))
        self._pool_size = workers

    @property
    def backend_name(self) -> str:
        """The backend's name, as stored on each face."""
        return self.backend.name

    @property
    def threshold(self) -> float:
        """Cosine similarity at or above which two faces are the same person, for this backend."""
        return self.backend.same_person_threshold

    @property
    def embedding_dim(self) -> int:
        """Length of this backend's embeddings."""
        return self.backend.embedding_dim

    def detect(self, image: ImageInput, *, embed: bool = True) -> list[Face]:
        """Faces in ``image`` (any source :func:`load_image` accepts), largest first."""
        arr = load_image(image)
        self.calls["detect"] += 1
        faces = self.backend.detect(arr, embed=embed)
        if embed:
            self.calls["embed"] += len(faces)
        return faces

    def align(self, image: ImageInput, face: Face, size: int = 112) -> np.ndarray:
        """The face cropped and aligned to the ArcFace ``size``×``size`` frame (RGB uint8)."""
        return align_face(load_image(image), face.landmarks, size)

    def analyze(self, image: ImageInput) -> ImageFaces:
        """Like :meth:`detect`, but an unreadable image becomes an ``ImageFaces`` with ``error`` set."""
        name = describe_source(image)
        try:
            arr = load_image(image)
        except ImageLoadError as exc:
            return ImageFaces(name, error=exc.reason)
        self.calls["detect"] += 1
        faces = self.backend.detect(arr)
        self.calls["embed"] += len(faces)
        return ImageFaces(name, faces, size=(arr.shape[1], arr.shape[0]))

    def iter_analyze(self, images: Iterable[ImageInput], workers: int = 1) -> Iterator[ImageFaces]:
        """Analyze images in order, in ``workers`` processes when > 1; bad images yield errors."""
        images = list(images)
        if workers <= 1 or len(images) <= 1:
            for img in images:
                yield self.analyze(img)
            return
        self.start_workers(workers)
        for res in self._pool.imap(_worker_analyze, images, chunksize=1):
            self.calls["detect"] += int(res.error is None)
            self.calls["embed"] += len(res.faces)
            yield res

    def analyze_many(self, images: Sequence[ImageInput], workers: int = 1, progress: bool = True,
                     description: str = "faces") -> list[ImageFaces]:
        """Analyze a batch with a progress bar; one result per input, in order."""
        from ..progress import track

        return list(track(self.iter_analyze(images, workers), total=len(images), description=description,
                          enabled=progress))


_WORKER: FaceAnalyzer | None = None


def _worker_init(spec: dict) -> None:
    global _WORKER
    spec = dict(spec)
    _WORKER = FaceAnalyzer(spec.pop("backend"), **spec)


def _worker_analyze(image: ImageInput) -> ImageFaces:
    assert _WORKER is not None
    return _WORKER.analyze(image)
