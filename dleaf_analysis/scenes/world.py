"""The synthetic scene world: vocabulary, co-occurrence structure and scene sampling.

The world's specification lives in ``data/world.json`` (a readable file shipped with the
package).  A :class:`World` samples :class:`Scene` objects (ground truth only, no pixels);
:mod:`dleaf_analysis.scenes.render` turns a scene into an RGB image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from dleaf_analysis.paths import DATA_DIR

WORLD_FILE = DATA_DIR / "world.json"
SHAPES = ("circle", "ring", "square", "triangle", "diamond", "cross", "hbar", "vbar")
TEXTURES = ("solid", "stripes", "dots", "checker")


@dataclass(frozen=True)
class SceneObject:
    """One object instance: class name, box ``(x0, y0, size)`` in pixels, colour jitter."""

    name: str
    x0: int
    y0: int
    size: int
    jitter: tuple[int, int, int] = (0, 0, 0)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, exclusive end."""
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image.

    ``objects`` are drawn in order (later ones on top); ``clutter`` are small distractor
    strokes ``(x0, y0, w, h, r, g, b)`` drawn below every object; ``seed`` drives the
    background and pixel noise, so removing an object changes no other pixel.
    """

    seed: int
    objects: tuple[SceneObject, ...]
    clutter: tuple[tuple[int, ...], ...]
    background: tuple[int, int, int]
    template: int
    order: tuple[int, ...]  # caption order: indices into ``objects``

    @property
    def names(self) -> list[str]:
        """Object class names, in drawing order (may repeat only if the world allows)."""
        return [o.name for o in self.objects]

    @property
    def name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    def without(self, name: str) -> "Scene":
        """The same scene with every instance of ``name`` removed (a counterfactual)."""
        if name not in self.name_set:
            raise ValueError(f"{name!r} is not in this scene (objects: {self.names})")
        keep = [i for i, o in enumerate(self.objects) if o.name != name]
        remap = {old: new for new, old in enumerate(keep)}
        return replace(
            self,
            objects=tuple(self.objects[i] for i in keep),
            order=tuple(remap[i] for i in self.order if i in remap),
        )

    def with_object(self, obj: SceneObject) -> "Scene":
        """The same scene with ``obj`` drawn on top of everything (a counterfactual)."""
        if obj.name in self.name_set:
            raise ValueError(f"{obj.name!r} is already in this scene")
        return replace(self, objects=self.objects + (obj,), order=self.order + (len(self.objects),))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(
            seed=int(d["seed"]),
            objects=tuple(
                SceneObject(o["name"], o["x0"], o["y0"], o["size"], tuple(o["jitter"]))
                for o in d["objects"]
            ),
            clutter=tuple(tuple(c) for c in d["clutter"]),
            background=tuple(d["background"]),
            template=int(d["template"]),
            order=tuple(d["order"]),
        )


@dataclass
class World:
    """A scene world from its specification (see ``data/world.json``)."""

    spec: dict = field(repr=False)

    @classmethod
    def load(cls, path: str | Path = WORLD_FILE) -> "World":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"world specification not found: {path}")
        spec = json.loads(path.read_text())
        world = cls(spec)
        world.validate()
        return world

    def validate(self) -> None:
        s = self.spec
        classes = s["classes"]
        for name, c in classes.items():
            if c["shape"] not in SHAPES or c["texture"] not in TEXTURES or c["colour"] not in s["colours"]:
                raise ValueError(f"class {name!r} has an unknown shape, texture or colour: {c}")
        grouped = [n for g in s["groups"].values() for n in g] + list(s["loners"])
        if sorted(grouped) != sorted(classes):
            raise ValueError("every class must be in exactly one group or in 'loners'")
        for a, b in s.get("strong_pairs", []):
            if self.group_of(a) != self.group_of(b) or self.group_of(a) is None:
                raise ValueError(f"strong pair {a}-{b} must be inside one group")

    @cached_property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @cached_property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    def group_of(self, name: str) -> str | None:
        for g, members in self.spec["groups"].items():
            if name in members:
                return g
        return None

    @cached_property
    def partners(self) -> dict[str, list[str]]:
        """Strong co-occurrence partners of each class (symmetric)."""
        out: dict[str, list[str]] = {c: [] for c in self.classes}
        for a, b in self.spec.get("strong_pairs", []):
            out[a].append(b)
            out[b].append(a)
        return out

    def article(self, name: str) -> str:
        return "an" if name[0] in "aeiou" else "a"

    # -- sampling -----------------------------------------------------------------------
    def sample_names(self, rng: np.random.Generator) -> list[str]:
        """Sample the set of object classes of one scene (co-occurrence structure)."""
        s = self.spec
        names: list[str] = []
        if rng.random() < s["p_group_scene"]:
            groups = list(s["groups"])
            members = s["groups"][groups[rng.integers(len(groups))]]
            anchor = members[rng.integers(len(members))]
            names = [anchor] + [m for m in members if m != anchor and rng.random() < s["p_partner"]]
            for a, b in s.get("strong_pairs", []):
                if (a in names) != (b in names) and rng.random() < s["p_pair"]:
                    names.append(b if a in names else a)
            while rng.random() < s["p_extra_loner"] and len(names) < s["max_objects"]:
                cand = [x for x in s["loners"] if x not in names]
                names.append(cand[rng.integers(len(cand))])
        else:
            k = int(rng.integers(1, 4))
            names = list(rng.choice(self.classes, size=k, replace=False))
        rng.shuffle(names)
        return names[: s["max_objects"]]

    def sample_scene(self, seed: int) -> Scene:
        """A whole scene (classes, boxes, clutter, caption template) from one integer seed."""
        rng = np.random.default_rng(seed)
        s = self.spec
        size = self.image_size
        names = self.sample_names(rng)
        lo, hi = s["object_size"]
        objects: list[SceneObject] = []
        for name in names:
            for _ in range(40):
                sz = int(rng.integers(lo, hi + 1))
                x0, y0 = (int(v) for v in rng.integers(0, size - sz + 1, size=2))
                cand = SceneObject(name, x0, y0, sz, tuple(int(v) for v in rng.integers(-15, 16, size=3)))
                if all(_overlap(cand, o) <= 0.2 for o in objects):
                    objects.append(cand)
                    break
        if not objects:  # cannot happen with sane specs, but keep the invariant
            objects.append(SceneObject(names[0], 0, 0, lo))
        n_clutter = int(rng.integers(s["clutter"][0], s["clutter"][1] + 1))
        clutter = []
        for _ in range(n_clutter):
            w, h = (int(v) for v in rng.integers(1, 6, size=2))
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            clutter.append((x0, y0, w, h, *(int(v) for v in rng.integers(0, 256, size=3))))
        background = tuple(int(v) for v in rng.integers(60, 170, size=3))
        template = int(rng.integers(len(s["caption_templates"])))
        order = tuple(int(i) for i in rng.permutation(len(objects)))
        return Scene(
            seed=int(rng.integers(2**31)),
            objects=tuple(objects),
            clutter=tuple(clutter),
            background=background,
            template=template,
            order=order,
        )

    def is_partner_absent(self, scene: Scene) -> bool:
        """True when a strong co-occurrence partner of a present object is absent."""
        present = scene.name_set
        return any(p not in present for n in present for p in self.partners[n])

    # -- text ---------------------------------------------------------------------------
    def object_list(self, names: list[str]) -> str:
        """``['fork', 'cup', 'plate'] -> 'a fork , a cup and a plate'`` (word tokens)."""
        parts = [f"{self.article(n)} {n}" for n in names]
        if len(parts) == 1:
            return parts[0]
        return " , ".join(parts[:-1]) + " and " + parts[-1]

    def caption(self, scene: Scene) -> str:
        """The reference caption: every object once, in the scene's caption order."""
        names = []
        for i in scene.order:
            if scene.objects[i].name not in names:
                names.append(scene.objects[i].name)
        tpl = self.spec["caption_templates"][scene.template]
        return tpl.format(objects=self.object_list(names))

    def question(self, name: str) -> str:
        return self.spec["question_template"].format(article=self.article(name), object=name)

    @property
    def caption_prompt(self) -> str:
        return self.spec["caption_prompt"]

    @cached_property
    def words(self) -> list[str]:
        """Every word the world's captions, prompts and questions use (tokenizer vocabulary)."""
        s = self.spec
        text = " ".join(s["caption_templates"] + [s["caption_prompt"], s["question_template"]])
        text = text.replace("{objects}", "a an and ,").replace("{article}", "").replace("{object}", "")
        words = set(text.split()) | set(self.classes) | {"yes", "no"}
        return sorted(words)


def _overlap(a: SceneObject, b: SceneObject) -> float:
    """Intersection area over the smaller box's area."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    iw = max(0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0, min(ay1, by1) - max(ay0, by0))
    return iw * ih / min(a.size**2, b.size**2)
