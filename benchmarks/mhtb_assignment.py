"""MultiHuman-Testbench's ID similarity: the release's assignment (``compute_scores.py``'s own
``hungarian_algorithm``, re-implemented as ``withanyone.bench.multihuman.release_assignment``) against the optimal
one, on random cosine matrices with planted true pairs and on real photos.

Usage: python benchmarks/mhtb_assignment.py [--trials 2000] [--photos DIR] [--no-photos]

Random: per shape (1–5 people × one face fewer / as many / one more) ``--trials`` matrices, strangers
uniform in [−0.1, 0.3], the true pairs in [0.3, 0.8]. Real (dlib): every person of ``../shared/data/faces``
(or the bundled samples) with two photos; a reference photo per person, and "generated" faces = the other photo
of each person shown, for every ordered choice of 2–5 people of whom one is left out of the image (the case
where the release's assignment is biased). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from withanyone.bench.multihuman import hungarian_id  # noqa: E402

SHARED = (ROOT.parent / "shared" / "data" / "faces").resolve()
SAMPLES = (ROOT / "samples" / "faces").resolve()


def random_gap(trials: int, seed: int = 0) -> dict:
    """Per shape: how often the release's value is below the optimum, and by how much."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in range(1, 6):
        for m in (n - 1, n, n + 1):
            if m < 1:
                continue
            d = []
            for _ in range(trials):
                s = rng.uniform(-0.1, 0.3, (n, m))
                k = min(n, m)
                s[rng.permutation(n)[:k], rng.permutation(m)[:k]] = rng.uniform(0.3, 0.8, k)
                d.append(hungarian_id(s, n, "optimal")[0] - hungarian_id(s, n, "release")[0])
            d = np.array(d)
            out[f"{n}x{m}"] = {"suboptimal": float(np.mean(d > 1e-12)), "mean_loss": float(d.mean()),
                               "max_loss": float(d.max())}
    return out


def photo_gap(folder: Path) -> dict:
    """Real dlib embeddings: n references, the image shows n − 1 of them (other photos); release vs optimal."""
    from withanyone.faces import FaceAnalyzer

    fa = FaceAnalyzer("dlib")
    emb = {}
    for person in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "group"):
        photos = sorted(person.glob("*.jpg"))[:2]
        if len(photos) < 2:
            continue
        faces = [fa.detect(p) for p in photos]
        if all(len(f) == 1 for f in faces):
            emb[person.name] = (faces[0][0].embedding, faces[1][0].embedding)
    names = sorted(emb)
    res = {}
    for n in range(2, 6):
        d = []
        for people in itertools.permutations(names, n):
            if len(d) >= 3000:
                break
            refs = np.stack([emb[p][0] for p in people])
            for left_out in range(n):
                gen = np.stack([emb[p][1] for k, p in enumerate(people) if k != left_out])
                sim = refs @ gen.T
                d.append(hungarian_id(sim, n, "optimal")[0] - hungarian_id(sim, n, "release")[0])
        d = np.array(d)
        res[str(n)] = {"images": int(d.size), "suboptimal": float(np.mean(d > 1e-12)), "mean_loss": float(d.mean()),
                       "max_loss": float(d.max())}
    return {"people": len(names), "by_people": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--photos", type=Path, default=SHARED if SHARED.is_dir() else SAMPLES)
    ap.add_argument("--no-photos", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rnd = random_gap(args.trials)
    for shape, v in rnd.items():
        print(f"random {shape}: release below optimum in {v['suboptimal']:.1%}, mean loss {v['mean_loss']:.4f}, "
              f"max {v['max_loss']:.3f}")
    real = None if args.no_photos else photo_gap(args.photos)
    if real:
        for n, v in real["by_people"].items():
            print(f"dlib photos, {n} people, one left out of the image ({v['images']} images): release below "
                  f"optimum in {v['suboptimal']:.1%}, mean loss {v['mean_loss']:.4f}, max {v['max_loss']:.3f}")
    fewer = [v for k, v in rnd.items() if int(k.split("x")[1]) < int(k.split("x")[0])]
    print(json.dumps({"random_fewer_faces_suboptimal": round(float(np.mean([v["suboptimal"] for v in fewer])), 4),
                      "random_enough_faces_suboptimal": round(float(np.mean(
                          [v["suboptimal"] for k, v in rnd.items() if int(k.split("x")[1]) >= int(k.split("x")[0])])), 4),
                      "photos": real and {n: round(v["suboptimal"], 4) for n, v in real["by_people"].items()},
                      "photos_mean_loss": real and {n: round(v["mean_loss"], 4) for n, v in real["by_people"].items()},
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
