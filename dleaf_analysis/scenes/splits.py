"""Frozen splits of the scene world, their manifests, and POPE-style questions.

A split is defined by a seed and a size (``SPLITS``); scene ``i`` of a split is sampled from
a seed derived from ``(split seed, i)``, so any image can be regenerated alone.  Each split
has a manifest in ``data/splits/`` with a content hash over its annotations and pixels, so
every number ties to its exact data.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import pandas as pd

from dleaf_analysis.paths import DATA_DIR
from dleaf_analysis.scenes.render import render
from dleaf_analysis.scenes.world import Scene, World
from dleaf_analysis.errors import DleafError

SPLITS_DIR = DATA_DIR / "splits"
POPE_VARIANTS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class SplitDef:
    seed: int
    size: int
    kind: str = "natural"  # or "partner_absent"


SPLITS: dict[str, SplitDef] = {
    "train": SplitDef(seed=1000, size=20000),
    "dev": SplitDef(seed=2000, size=1000),  # tuning
    "confirm": SplitDef(seed=2500, size=500),  # confirms a tuned choice before it ships
    "test": SplitDef(seed=3000, size=500),
    "test-partner-absent": SplitDef(seed=4000, size=300, kind="partner_absent"),
    "replication": SplitDef(seed=5000, size=2000),  # fresh images: every headline is repeated here
}


def _scene_seed(split_seed: int, i: int) -> int:
    return int(np.random.SeedSequence([split_seed, i]).generate_state(1)[0])


class UnknownSplitError(DleafError, ValueError):
    pass


@dataclass
class Split:
    """The scenes of one frozen split (ground truth; images rendered on demand)."""

    name: str
    definition: SplitDef
    world: World
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, i: int) -> np.ndarray:
        """RGB ``uint8 [H, W, 3]`` of scene ``i``."""
        return render(self.world, self.scenes[i])

    def images(self) -> np.ndarray:
        """All images, ``uint8 [N, H, W, 3]``."""
        return np.stack([self.image(i) for i in range(len(self))])

    def caption(self, i: int) -> str:
        return self.world.caption(self.scenes[i])

    @cached_property
    def annotations_hash(self) -> str:
        return annotations_hash(self.scenes)

    def content_hash(self) -> str:
        """Hash of annotations and rendered pixels (renders every image)."""
        h = hashlib.sha256(self.annotations_hash.encode())
        for i in range(len(self)):
            h.update(self.image(i).tobytes())
        return h.hexdigest()[:16]

    def manifest(self, with_pixels: bool = True) -> dict:
        counts = Counter(n for s in self.scenes for n in s.name_set)
        return {
            "split": self.name,
            "seed": self.definition.seed,
            "size": len(self),
            "kind": self.definition.kind,
            "world": self.world.spec["name"],
            "world_hash": self.world.spec_hash,
            "annotations_hash": self.annotations_hash,
            "prefix_hashes": {str(n): annotations_hash(self.scenes[:n]) for n in prefix_sizes(len(self))},
            "content_hash": self.content_hash() if with_pixels else None,
            "mean_objects": round(float(np.mean([len(s.name_set) for s in self.scenes])), 3),
            "partner_absent_fraction": round(
                float(np.mean([self.world.is_partner_absent(s) for s in self.scenes])), 3
            ),
            "class_counts": dict(sorted(counts.items())),
            "object_stats": ObjectStats.from_scenes(self.scenes).to_dict(),
        }

    def frame(self) -> pd.DataFrame:
        """One row per image: index, objects, reference caption."""
        return pd.DataFrame(
            {
                "image": range(len(self)),
                "objects": [sorted(s.name_set) for s in self.scenes],
                "caption": [self.caption(i) for i in range(len(self))],
            }
        )


def prefix_sizes(size: int) -> list[int]:
    """The prefix lengths a manifest records a hash for: 8, 16, 32, ... below ``size``, and ``size``."""
    out, n = [], 8
    while n < size:
        out.append(n)
        n *= 2
    return out + [size]


def annotations_hash(scenes: list[Scene]) -> str:
    blob = json.dumps([s.to_dict() for s in scenes], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_SAMPLED: dict[tuple[str, str], tuple[list[Scene], list[int]]] = {}  # (split, world hash) -> (scenes, next seed index)


def _scenes(name: str, world: World, n: int) -> list[Scene]:
    """The first ``n`` scenes of a split.  Sampled scenes are kept per process and a longer request
    extends them (sampling a scene is not free: a 20,000-scene split takes about a minute)."""
    d = SPLITS[name]
    scenes, j = _SAMPLED.setdefault((name, world.spec_hash), ([], [0]))
    while len(scenes) < n:
        sc = world.sample_scene(_scene_seed(d.seed, j[0]))
        j[0] += 1
        if d.kind == "partner_absent" and not world.is_partner_absent(sc):
            continue
        scenes.append(sc)
    return list(scenes[:n])


def load_split(name: str, world: World | None = None, limit: int | None = None, verify: bool = True) -> Split:
    """Load a frozen split by name; ``limit`` keeps its first ``limit`` scenes.

    With ``verify`` the annotations are checked against the shipped manifest: the hash of the
    shortest recorded prefix that covers ``limit`` (``prefix_sizes``), so a short load samples
    few scenes; a manifest without prefix hashes is checked on the whole split.
    """
    if name not in SPLITS:
        raise UnknownSplitError(f"unknown split {name!r}; choose one of {sorted(SPLITS)}")
    world = world or World.load()
    d = SPLITS[name]
    n = d.size if limit is None else min(limit, d.size)
    if verify:
        path = SPLITS_DIR / f"{name}.json"
        shipped = json.loads(path.read_text()) if path.is_file() else None
        if shipped is not None:
            prefixes = {int(k): v for k, v in shipped.get("prefix_hashes", {}).items()} or {
                d.size: shipped["annotations_hash"]}
            m = min(k for k in prefixes if k >= n)
            scenes = _scenes(name, world, m)
            got = annotations_hash(scenes)
            if got != prefixes[m]:
                raise RuntimeError(
                    f"split {name!r} does not match its manifest {path} (annotations hash of its first {m} scenes "
                    f"{got} != {prefixes[m]}): the world specification or the generator changed; run "
                    "`dleaf make-splits` to refreeze"
                )
            return Split(name, d, world, scenes[:n])
    return Split(name, d, world, _scenes(name, world, n))


def write_manifests(world: World | None = None, with_pixels: bool = True) -> dict[str, dict]:
    """(Re)freeze every split: write ``data/splits/<name>.json``."""
    world = world or World.load()
    SPLITS_DIR.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in SPLITS:
        m = load_split(name, world, verify=False).manifest(with_pixels=with_pixels)
        (SPLITS_DIR / f"{name}.json").write_text(json.dumps(m, indent=1) + "\n")
        out[name] = m
    return out


# -- POPE-style questions ---------------------------------------------------------------
@dataclass(frozen=True)
class ObjectStats:
    """Class frequencies and co-occurrence counts, from a split's annotations."""

    frequency: dict[str, int]
    cooccurrence: dict[tuple[str, str], int]

    @classmethod
    def from_scenes(cls, scenes: list[Scene]) -> "ObjectStats":
        freq: Counter = Counter()
        co: Counter = Counter()
        for s in scenes:
            names = sorted(s.name_set)
            freq.update(names)
            for a in names:
                for b in names:
                    if a != b:
                        co[(a, b)] += 1
        return cls(dict(freq), dict(co))

    def to_dict(self) -> dict:
        """JSON-ready: ``frequency`` by class, ``cooccurrence`` as sorted ``[a, b, count]`` rows."""
        return {"frequency": dict(sorted(self.frequency.items())),
                "cooccurrence": [[a, b, n] for (a, b), n in sorted(self.cooccurrence.items())]}

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectStats":
        return cls(dict(d["frequency"]), {(a, b): int(n) for a, b, n in d["cooccurrence"]})


@lru_cache(maxsize=2)
def train_object_stats() -> ObjectStats:
    """Class frequencies and co-occurrences of the train split (POPE popular/adversarial), as recorded
    in its manifest when the split was frozen (sampling its 20,000 scenes takes about 30 s in every
    process); recomputed from the split when the manifest lacks them or was frozen for another world."""
    world = World.load()
    path = SPLITS_DIR / "train.json"
    shipped = json.loads(path.read_text()) if path.is_file() else {}
    if "object_stats" in shipped and shipped.get("world_hash") == world.spec_hash:
        return ObjectStats.from_dict(shipped["object_stats"])
    return ObjectStats.from_scenes(load_split("train", world).scenes)


def pope_questions(split: Split, variant: str, stats: ObjectStats, n_per_image: int = 3, seed: int = 0) -> pd.DataFrame:
    """POPE questions (Li et al. 2023) for every image of a split.

    Per image: up to ``n_per_image`` present objects ("yes") and as many absent ones ("no"),
    the negatives sampled ``random``-ly, by ``popular``-ity, or ``adversarial``-ly (the absent
    classes that co-occur most with the present ones).  Returns one row per question.
    """
    if variant not in POPE_VARIANTS:
        raise ValueError(f"unknown POPE variant {variant!r}; choose one of {POPE_VARIANTS}")
    world = split.world
    rows = []
    popular = sorted(world.classes, key=lambda c: (-stats.frequency.get(c, 0), c))
    for i, sc in enumerate(split.scenes):
        rng = np.random.default_rng([seed, POPE_VARIANTS.index(variant), i])
        present = sorted(sc.name_set)
        absent = [c for c in world.classes if c not in sc.name_set]
        k = min(n_per_image, len(present), len(absent))
        pos = list(rng.choice(present, size=k, replace=False))
        if variant == "random":
            neg = list(rng.choice(absent, size=k, replace=False))
        elif variant == "popular":
            neg = [c for c in popular if c in absent][:k]
        else:
            score = {c: sum(stats.cooccurrence.get((p, c), 0) for p in present) for c in absent}
            neg = sorted(absent, key=lambda c: (-score[c], c))[:k]
        for obj, label in [(o, "yes") for o in pos] + [(o, "no") for o in neg]:
            rows.append({"image": i, "variant": variant, "object": str(obj), "label": label,
                         "question": world.question(str(obj))})
    return pd.DataFrame(rows)
