"""The synthetic scene world: vocabulary, co-occurrence structure, scene sampling and the
detailed descriptions the embedded model learns.

The world's specification lives in ``data/world.json`` (a readable file shipped with the
package).  A :class:`World` samples :class:`Scene` objects (ground truth only, no pixels);
:mod:`dleaf_analysis.scenes.render` turns a scene into an RGB image.

A scene holds 8-15 object instances of a few classes in clutter.  Its reference description
(:meth:`World.caption`) is written the way LLaVA's detailed-description data is: a setting
sentence, then one sentence per class in *salience* order (largest instance first, then
nearest the centre) with its count, size, colour, texture and position (every instance's
position when there are several), then one or two spatial relations between named classes,
and, in a share of the scenes (``p_absent_context``), a last sentence naming a group-typical
object that is *not* in the image (the co-occurrence guess such data contains).  Every object
word is a class name or its plural, so CHAIR stays exact.
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
TEXTURE_WORDS = {"solid": None, "stripes": "striped", "dots": "dotted", "checker": "checkered"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
# 3 x 3 grid of the image: (row, column) -> phrase
POSITION_WORDS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}


@dataclass(frozen=True)
class SceneObject:
    """One object instance: class name, box ``(x0, y0, size)`` in pixels, colour name, colour jitter."""

    name: str
    x0: int
    y0: int
    size: int
    jitter: tuple[int, int, int] = (0, 0, 0)
    colour: str = ""  # "" = the class's first colour

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, exclusive end."""
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)

    @property
    def centre(self) -> tuple[float, float]:
        """``(x, y)`` of the box centre in pixels."""
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image.

    ``objects`` are drawn in order (later ones on top); ``clutter`` are small distractor
    strokes ``(x0, y0, w, h, r, g, b)`` drawn below every object; ``seed`` drives the
    background and pixel noise, so removing an object changes no other pixel.  ``template``
    seeds the phrasing of the description (per class, so a counterfactual keeps the phrasing of
    every other class); ``setting`` is the scene type the description opens with (a group
    name, or ``mixed``); ``context`` is the absent object the description guesses at the end
    (``None``: no guess).
    """

    seed: int
    objects: tuple[SceneObject, ...]
    clutter: tuple[tuple[int, ...], ...]
    background: tuple[int, int, int]
    template: int
    setting: str = "mixed"
    context: str | None = None

    @property
    def names(self) -> list[str]:
        """Object class names of every instance, in drawing order (repeats for several instances)."""
        return [o.name for o in self.objects]

    @property
    def name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    def instances(self, name: str) -> list[SceneObject]:
        return [o for o in self.objects if o.name == name]

    def without(self, name: str) -> "Scene":
        """The same scene with every instance of ``name`` removed (a counterfactual)."""
        if name not in self.name_set:
            raise ValueError(f"{name!r} is not in this scene (objects: {sorted(self.name_set)})")
        return replace(self, objects=tuple(o for o in self.objects if o.name != name))

    def with_object(self, obj: SceneObject) -> "Scene":
        """The same scene with ``obj`` drawn on top of everything (a counterfactual)."""
        if obj.name in self.name_set:
            raise ValueError(f"{obj.name!r} is already in this scene")
        return replace(self, objects=self.objects + (obj,),
                       context=None if self.context == obj.name else self.context)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(
            seed=int(d["seed"]),
            objects=tuple(
                SceneObject(o["name"], o["x0"], o["y0"], o["size"], tuple(o["jitter"]), o.get("colour", ""))
                for o in d["objects"]
            ),
            clutter=tuple(tuple(c) for c in d["clutter"]),
            background=tuple(d["background"]),
            template=int(d["template"]),
            setting=d.get("setting", "mixed"),
            context=d.get("context"),
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
            if c["shape"] not in SHAPES or c["texture"] not in TEXTURES or not c["colours"] \
                    or any(col not in s["colours"] for col in c["colours"]):
                raise ValueError(f"class {name!r} has an unknown shape, texture or colour: {c}")
        grouped = [n for g in s["groups"].values() for n in g] + list(s["loners"])
        if sorted(grouped) != sorted(classes):
            raise ValueError("every class must be in exactly one group or in 'loners'")
        for a, b in s.get("strong_pairs", []):
            if self.group_of(a) != self.group_of(b) or self.group_of(a) is None:
                raise ValueError(f"strong pair {a}-{b} must be inside one group")
        plurals = [self.plural(c) for c in classes]
        if len(set(plurals) | set(classes)) != 2 * len(classes):
            raise ValueError("class names and their plurals must all be distinct words")
        lo, hi = s["instances_per_scene"]
        if not 1 <= lo <= hi or s["classes_per_scene"][0] < 1:
            raise ValueError("instances_per_scene and classes_per_scene must be increasing positive ranges")

    @cached_property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @cached_property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    def plural(self, name: str) -> str:
        return self.spec["classes"][name].get("plural", name + "s")

    @cached_property
    def object_words(self) -> dict[str, str]:
        """Every word that names an object -> its class (singular and plural forms)."""
        out = {c: c for c in self.classes}
        out.update({self.plural(c): c for c in self.classes})
        return out

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

    def colour_of(self, obj: SceneObject) -> str:
        return obj.colour or self.spec["classes"][obj.name]["colours"][0]

    # -- sampling -----------------------------------------------------------------------
    def sample_names(self, rng: np.random.Generator) -> tuple[list[str], str]:
        """The object classes of one scene and its setting (co-occurrence structure)."""
        s = self.spec
        lo, hi = s["classes_per_scene"]
        if rng.random() < s["p_group_scene"]:
            groups = list(s["groups"])
            setting = groups[rng.integers(len(groups))]
            members = s["groups"][setting]
            anchor = members[rng.integers(len(members))]
            names = [anchor] + [m for m in members if m != anchor and rng.random() < s["p_partner"]]
            for a, b in s.get("strong_pairs", []):
                if (a in names) != (b in names) and rng.random() < s["p_pair"]:
                    names.append(b if a in names else a)
            while (rng.random() < s["p_extra_loner"] or len(names) < lo) and len(names) < hi:
                cand = [x for x in s["loners"] if x not in names]
                names.append(cand[rng.integers(len(cand))])
        else:
            setting = "mixed"
            k = int(rng.integers(lo, min(hi, 5) + 1))
            names = [str(x) for x in rng.choice(self.classes, size=k, replace=False)]
        rng.shuffle(names)
        return names[:hi], setting

    def _sample_size(self, rng: np.random.Generator) -> int:
        lo, hi = self.spec["object_size"]
        return int(lo + round((hi - lo) * rng.random() ** self.spec.get("size_skew", 1.0)))

    def sample_scene(self, seed: int) -> Scene:
        """A whole scene (classes, instances, boxes, clutter, phrasing seed) from one integer seed."""
        rng = np.random.default_rng(seed)
        s = self.spec
        size = self.image_size
        names, setting = self.sample_names(rng)
        n_total = int(rng.integers(s["instances_per_scene"][0], s["instances_per_scene"][1] + 1))
        cap = s["max_instances_per_class"]
        counts = {n: 1 for n in names}
        while sum(counts.values()) < min(n_total, cap * len(names)):
            n = names[int(rng.integers(len(names)))]
            if counts[n] < cap:
                counts[n] += 1
        objects: list[SceneObject] = []
        for name in names:
            cols = s["classes"][name]["colours"]
            colour = cols[int(rng.integers(len(cols)))]
            for _ in range(counts[name]):
                for _ in range(60):
                    sz = self._sample_size(rng)
                    x0, y0 = (int(v) for v in rng.integers(0, size - sz + 1, size=2))
                    cand = SceneObject(name, x0, y0, sz, tuple(int(v) for v in rng.integers(-15, 16, size=3)), colour)
                    if all(_overlap(cand, o) <= s["max_overlap"] for o in objects):
                        objects.append(cand)
                        break
        order = rng.permutation(len(objects))  # drawing order: instances of a class interleave
        objects = [objects[i] for i in order]
        n_clutter = int(rng.integers(s["clutter"][0], s["clutter"][1] + 1))
        clutter = []
        for _ in range(n_clutter):
            w, h = (int(v) for v in rng.integers(1, 6, size=2))
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            clutter.append((x0, y0, w, h, *(int(v) for v in rng.integers(0, 256, size=3))))
        background = tuple(int(v) for v in rng.integers(60, 170, size=3))
        template = int(rng.integers(2**31))
        present = frozenset(o.name for o in objects)
        context = None
        if rng.random() < s["p_absent_context"]:
            context = self.context_guess(present, setting)
        return Scene(
            seed=int(rng.integers(2**31)),
            objects=tuple(objects),
            clutter=tuple(clutter),
            background=background,
            template=template,
            setting=setting,
            context=context,
        )

    def context_guess(self, present: frozenset[str], setting: str) -> str | None:
        """The absent object a description guesses from the present ones: an absent strong
        partner of a present object, else an absent member of the setting's group (first by
        name); ``None`` when the group is complete."""
        partners = sorted({p for n in present for p in self.partners[n] if p not in present})
        if partners:
            return partners[0]
        group = self.spec["groups"].get(setting, [])
        absent = sorted(m for m in group if m not in present)
        return absent[0] if absent else None

    def is_partner_absent(self, scene: Scene) -> bool:
        """True when a strong co-occurrence partner of a present object is absent."""
        present = scene.name_set
        return any(p not in present for n in present for p in self.partners[n])

    # -- text ---------------------------------------------------------------------------
    def salience_order(self, scene: Scene) -> list[str]:
        """Classes of a scene, most salient first: largest instance, then nearest the centre."""
        c = self.image_size / 2

        def key(name: str) -> tuple:
            best = max(scene.instances(name), key=lambda o: (o.size, -_dist(o.centre, c)))
            return (-best.size, _dist(best.centre, c), name)

        return sorted(scene.name_set, key=key)

    def position_phrase(self, obj: SceneObject) -> str:
        x, y = obj.centre
        third = self.image_size / 3
        return POSITION_WORDS[(min(2, int(y // third)), min(2, int(x // third)))]

    def size_word(self, obj: SceneObject) -> str | None:
        small, large = self.spec["size_words"]["small"], self.spec["size_words"]["large"]
        return "small" if obj.size <= small else "large" if obj.size >= large else None

    def _class_sentence(self, scene: Scene, name: str) -> str:
        insts = sorted(scene.instances(name), key=lambda o: (-o.size, o.y0, o.x0))
        cls = self.spec["classes"][name]
        colour = self.colour_of(insts[0])
        texture = TEXTURE_WORDS[cls["texture"]]
        rng = np.random.default_rng([scene.template, self.classes.index(name)])
        frame = int(rng.integers(3))
        if len(insts) == 1:
            o = insts[0]
            adj = " ".join(w for w in (self.size_word(o), colour, texture) if w)
            art = self.article(adj)
            pos = self.position_phrase(o)
            return [f"there is {art} {adj} {name} {pos} .", f"{art} {adj} {name} is {pos} .",
                    f"{pos} there is {art} {adj} {name} ."][frame]
        n = NUMBER_WORDS[len(insts)]
        adj = " ".join(w for w in (colour, texture) if w)
        where = [self.position_phrase(o) for o in insts]  # largest first
        listed = " , ".join(where[:-1]) + " and " + where[-1]
        plural = self.plural(name)
        return [f"there are {n} {adj} {plural} {listed} .", f"{n} {adj} {plural} are {listed} .",
                f"the image has {n} {adj} {plural} , {listed} ."][frame]

    def relations(self, scene: Scene, order: list[str]) -> list[tuple[str, str, str]]:
        """Up to ``max_relations`` ``(a, relation, b)`` between named classes: each of the two most
        salient classes with its nearest other class (largest instances), as written."""
        big = {n: max(scene.instances(n), key=lambda o: (o.size, -o.y0, -o.x0)) for n in order}
        out: list[tuple[str, str, str]] = []
        for a in order[: self.spec["max_relations"]]:
            others = [b for b in order if b != a and (b, a) not in {(x, z) for x, _, z in out}]
            if not others:
                break
            b = min(others, key=lambda n: (_dist(big[n].centre, big[a].centre[0], big[a].centre[1]), n))
            (ax, ay), (bx, by) = big[a].centre, big[b].centre
            rel = "above" if by - ay > 1.5 * abs(bx - ax) else "below" if ay - by > 1.5 * abs(bx - ax) else "next to"
            out.append((a, rel, b))
        return out

    def caption(self, scene: Scene) -> str:
        """The reference description of a scene (see the module doc)."""
        order = self.salience_order(scene)
        opening = ("the image shows several objects ." if scene.setting == "mixed"
                   else f"the image shows {self.article(scene.setting)} {scene.setting} scene .")
        sentences = [opening] + [self._class_sentence(scene, n) for n in order]
        sentences += [f"the {a} is {rel} the {b} ." for a, rel, b in self.relations(scene, order)]
        if scene.context is not None and scene.context not in scene.name_set:
            sentences.append(f"there may also be {self.article(scene.context)} {scene.context} nearby .")
        return " ".join(sentences)

    def question(self, name: str) -> str:
        return self.spec["question_template"].format(article=self.article(name), object=name)

    @property
    def caption_prompt(self) -> str:
        return self.spec["caption_prompt"]

    @property
    def system_prompt(self) -> str:
        return self.spec["system_prompt"]

    @cached_property
    def words(self) -> list[str]:
        """Every word the world's descriptions, prompts and questions use (tokenizer vocabulary)."""
        s = self.spec
        fixed = ("the image shows several objects scene there is are a an one and , : . in has may also be "
                 "nearby above below next to small large yes no")
        text = " ".join([fixed, s["caption_prompt"], s["system_prompt"], s["question_template"]])
        text = text.replace("{article}", "").replace("{object}", "")
        words = set(text.split()) | set(self.object_words) | set(s["groups"]) | set(s["colours"])
        words |= {w for w in TEXTURE_WORDS.values() if w} | set(NUMBER_WORDS.values())
        words |= {w for p in POSITION_WORDS.values() for w in p.split()}
        return sorted(words)


def _dist(p: tuple[float, float], x: float, y: float | None = None) -> float:
    y = x if y is None else y
    return float(np.hypot(p[0] - x, p[1] - y))


def _overlap(a: SceneObject, b: SceneObject) -> float:
    """Intersection area over the smaller box's area."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    iw = max(0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0, min(ay1, by1) - max(ay0, by0))
    return iw * ih / min(a.size**2, b.size**2)
