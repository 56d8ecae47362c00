"""Benchmark samples and method outputs: what a MultiID-Bench run scores."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Subset names: one person, two, three or four.
SUBSETS = ("p1", "p2", "p3")


def subset_for(num_persons: int) -> str:
    """The subset a sample with ``num_persons`` people belongs to: p1, p2, or p3 (three or four)."""
    if num_persons <= 1:
        return "p1"
    return "p2" if num_persons == 2 else "p3"


@dataclass
class Sample:
    """One benchmark item: a prompt, an optional GT photo, 1–4 reference photos (one person each),
    optional GT face boxes (x1, y1, x2, y2 per person) and its subset."""

    id: str
    prompt: str
    references: list[Path]
    gt: Path | None = None
    boxes: list[list[float]] | None = None
    num_persons: int = 0
    subset: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = str(self.id)
        self.references = [Path(p) for p in self.references]
        self.gt = Path(self.gt) if self.gt is not None else None
        if not self.num_persons:
            self.num_persons = max(1, len(self.references))
        if not self.subset:
            self.subset = subset_for(self.num_persons)


@dataclass
class Benchmark:
    """A named list of samples (ids unique)."""

    name: str
    samples: list[Sample]
    root: Path | None = None

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for s in self.samples:
            if s.id in seen:
                raise ValueError(f"benchmark {self.name!r}: sample id {s.id!r} appears twice")
            seen.add(s.id)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def by_id(self) -> dict[str, Sample]:
        """Samples keyed by id."""
        return {s.id: s for s in self.samples}

    def subsets(self) -> dict[str, int]:
        """Number of samples per subset."""
        out: dict[str, int] = {}
        for s in self.samples:
            out[s.subset] = out.get(s.subset, 0) + 1
        return out


@dataclass
class MethodOutputs:
    """A method's generated images keyed by sample id (a sample without an output is a failure)."""

    name: str
    outputs: dict[str, Path]

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"method name must be non-empty and contain no '/': {self.name!r}")
        self.outputs = {str(k): Path(v) for k, v in self.outputs.items()}
