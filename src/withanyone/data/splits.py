"""Splits: ``train_rec`` (kept photos), ``train_cp`` (every face identified and each person has at least one
other photo in the reference bank), the reference bank and the cluster centres."""

from __future__ import annotations

from collections.abc import Sequence

from .bank import ReferenceBank


def reference_counts(bank: ReferenceBank) -> dict[str, dict[int, int]]:
    """Per identity: photo index → how many of its bank photos come from that photo (to exclude self)."""
    out: dict[str, dict[int, int]] = {}
    for ident in bank.identities:
        per: dict[int, int] = {}
        for m in ident.members:
            per[m.photo] = per.get(m.photo, 0) + 1
        out[ident.id] = per
    return out


def in_train_cp(photo_index: int, names: Sequence[str | None], bank_sizes: dict[str, int],
                own_refs: dict[str, dict[int, int]]) -> bool:
    """True when every face has an identity and each identity has ≥ 1 bank photo other than this one."""
    if not names or any(n is None for n in names):
        return False
    for n in names:
        others = bank_sizes.get(n, 0) - own_refs.get(n, {}).get(photo_index, 0)
        if others < 1:
            return False
    return True
