"""Reference bank: per search name, the dominant identity cluster of its single-person photos.

Clustering choice: scikit-learn's ``AgglomerativeClustering`` (average linkage, cosine distance, cut at
``1 − member threshold``). A search name has tens to a few hundred photos, so the O(n²) distance matrix is
small; it needs no number of clusters (unlike k-means) and no density parameter to tune (unlike DBSCAN),
and average linkage resists a few look-alike outliers chaining clusters together (single linkage's
weakness). The dominant cluster is the largest; ties go to the tighter one. Members further than the
threshold from the final centre are rejected as outliers. faiss is used where the scale is large: the
assignment of every face against every centre (:mod:`.assign`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..faces.types import l2_normalize


@dataclass
class BankMember:
    """One reference photo of an identity: photo index, face index in it, embedding and source."""

    photo: int
    face: int
    embedding: np.ndarray
    source: str
    similarity: float = 0.0
    item: Any = None  # the InputItem, so the writer can re-read the photo (tar offsets) without a lookup
    embedding_norm: float = 1.0  # the recognizer's raw norm: reference tars store embedding × this (raw, as labels)


@dataclass
class BankIdentity:
    """An identity of the reference bank: id, search names merged into it, unit-norm centre, members."""

    id: str
    search_names: list[str]
    center: np.ndarray
    members: list[BankMember] = field(default_factory=list)

    @property
    def search_name(self) -> str:
        """The (first) search name."""
        return self.search_names[0]


@dataclass
class ReferenceBank:
    """Identities plus what was dropped: ``dropped`` maps search name → reason, ``outliers`` counts photos."""

    identities: list[BankIdentity]
    dropped: dict[str, str] = field(default_factory=dict)
    outliers: int = 0
    merged: list[list[str]] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        """Identity ids, in bank order."""
        return [p.id for p in self.identities]

    def centers(self) -> np.ndarray:
        """(num_identities, D) float32 matrix of centres."""
        if not self.identities:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([p.center for p in self.identities]).astype(np.float32)

    def table(self) -> dict[str, dict]:
        """``identities.json`` content: id → search name, merged names, member count."""
        return {p.id: {"search_name": p.search_name, "search_names": p.search_names, "members": len(p.members)}
                for p in self.identities}


def slugify(name: str) -> str:
    """Identity id from a search name: lowercase ASCII letters, digits and underscores.

    Other scripts are transliterated first (``anyascii``: "Nicolás Cage" → ``nicolas_cage``, "杨幂" →
    ``yangmi``, "Владимир" → ``vladimir``) so ids stay readable; the original name is kept as the
    identity's ``search_name`` in ``identities.json``.
    """
    from anyascii import anyascii

    slug = re.sub(r"[^a-z0-9]+", "_", anyascii(name).lower()).strip("_")
    return slug or "id"


def dominant_cluster(emb: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the largest average-linkage cluster of unit-norm ``emb`` cut at cosine ``threshold``."""
    n = len(emb)
    if n == 1:
        return np.array([0])
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                     distance_threshold=1.0 - threshold).fit_predict(emb)
    best, best_key = np.array([0]), None
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        c = l2_normalize(emb[idx].mean(0))
        key = (len(idx), float((emb[idx] @ c).mean()))
        if best_key is None or key > best_key:
            best, best_key = idx, key
    return best


def build_bank(candidates: dict[str, Sequence[BankMember]], member_threshold: float, merge_threshold: float,
               min_photos: int = 2) -> ReferenceBank:
    """Cluster each search name's single-person photos into one identity (see module docstring).

    ``candidates`` maps search name → its single-person photos. Names left with fewer than ``min_photos``
    members are dropped; identities whose centres reach ``merge_threshold`` are merged (same person under
    two names), keeping the name with more members first.
    """
    dropped: dict[str, str] = {}
    outliers = 0
    groups: list[BankIdentity] = []
    for name in sorted(candidates):
        members = list(candidates[name])
        if len(members) < min_photos:
            dropped[name] = f"only {len(members)} single-person photo(s), need {min_photos}"
            continue
        emb = l2_normalize(np.stack([m.embedding for m in members]))
        keep = dominant_cluster(emb, member_threshold)
        for _ in range(3):  # refine: centre of the kept members, drop those below the threshold
            c = l2_normalize(emb[keep].mean(0))
            new = np.flatnonzero(emb @ c >= member_threshold)
            if len(new) == 0 or np.array_equal(new, keep):
                break
            keep = new
        c = l2_normalize(emb[keep].mean(0))
        outliers += len(members) - len(keep)
        if len(keep) < min_photos:
            dropped[name] = f"dominant cluster has {len(keep)} photo(s), need {min_photos}"
            continue
        kept = [members[i] for i in keep]
        for m, s in zip(kept, emb[keep] @ c, strict=True):
            m.similarity = float(s)
        groups.append(BankIdentity(name, [name], c, kept))
    groups, merged = _merge(groups, merge_threshold)
    used: set[str] = set()
    for g in groups:
        base = slugify(g.search_name)
        gid, k = base, 2
        while gid in used:
            gid, k = f"{base}_{k}", k + 1
        used.add(gid)
        g.id = gid
    return ReferenceBank(groups, dropped, outliers, merged)


def _merge(groups: list[BankIdentity], threshold: float) -> tuple[list[BankIdentity], list[list[str]]]:
    """Union identities whose centres reach ``threshold`` (union-find over the centre similarity graph)."""
    n = len(groups)
    if n < 2:
        return groups, []
    c = np.stack([g.center for g in groups])
    sim = c @ c.T
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if sim[i, j] >= threshold:
                parent[find(j)] = find(i)
    clusters: dict[int, list[int]] = {}
    for i in range(n):
        clusters.setdefault(find(i), []).append(i)
    out, merged = [], []
    for idx in clusters.values():
        if len(idx) == 1:
            out.append(groups[idx[0]])
            continue
        idx.sort(key=lambda i: (-len(groups[i].members), groups[i].search_name))
        members = [m for i in idx for m in groups[i].members]
        center = l2_normalize(np.stack([m.embedding for m in members]).mean(0))
        names = [groups[i].search_name for i in idx]
        merged.append(names)
        out.append(BankIdentity(names[0], names, center, members))
    out.sort(key=lambda g: g.search_name)
    return out, merged
