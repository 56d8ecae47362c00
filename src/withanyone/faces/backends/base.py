"""The interface every face backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..types import Face


class FaceBackend(ABC):
    """Detect faces with 5-point landmarks and embed them; one instance per process (holds models)."""

    #: Short backend name, stored on every :class:`Face` it returns.
    name: str = "base"
    #: Length of the identity embedding.
    embedding_dim: int = 0
    #: Cosine similarity at or above which two faces are called the same person.
    same_person_threshold: float = 0.5

    @abstractmethod
    def detect(self, image: np.ndarray, *, embed: bool = True) -> list[Face]:
        """Faces in an RGB uint8 image, largest first; with ``embed`` their unit-norm embeddings too."""

    @abstractmethod
    def embed(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """Fill in the embeddings of ``faces`` detected on ``image`` (returns the same list)."""

    def spec(self) -> dict:
        """Constructor arguments that rebuild an equivalent backend in another process."""
        return {"backend": self.name}
