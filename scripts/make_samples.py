"""Rebuild ``samples/faces`` (the demo's bundled photos) from ``../shared/data/faces``: ≤ 512 px copies."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from PIL import Image, ImageOps

PEOPLE = {"obama": 3, "biden": 2, "kit_harington": 3, "rose_leslie": 2, "scarlett": 3, "yangmi": 3,
          "newton": 3, "alex_lacamoire": 3}
MAX_SIDE = 512


def main(src: Path = Path("../shared/data/faces"), dst: Path = Path("samples/faces")) -> None:
    rows = list(csv.reader(open(src / "SOURCES.tsv"), delimiter="\t"))
    header, rows = rows[0], {r[0]: r for r in rows[1:] if r and not r[0].startswith("#")}
    files = [f"{p}/{i}.jpg" for p, n in PEOPLE.items() for i in range(1, n + 1)]
    files += [f"group/{i}.jpg" for i in range(1, 5)]
    out_rows = []
    for rel in files:
        im = ImageOps.exif_transpose(Image.open(src / rel)).convert("RGB")
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(dst / rel, quality=90)
        r = rows.get(rel, [rel, "", "", "", ""])
        out_rows.append([rel, *r[1:4], f"resized to {im.size[0]}x{im.size[1]} from {r[3] if len(r) > 3 else '?'}"])
    with open(dst / "SOURCES.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["# file", "repo@commit", "path in repo", "original size", "note"])
        w.writerows(out_rows)
    labels = json.loads((src / "labels.json").read_text())
    (dst / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:]))
