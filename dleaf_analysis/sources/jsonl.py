"""A user's annotated images as an image source: a JSON Lines file, one image per line::

    {"image": "photos/001.jpg", "objects": ["dog", {"name": "frisbee", "box": [x, y, w, h]},
                                            {"name": "person", "mask": "masks/001-person.png"}]}

``image`` and ``mask`` paths are relative to the file's folder; an optional ``"id"`` names the
item (default: the image path).  An object given as a plain name is ground truth but cannot be
removed; a ``box`` (COCO ``[x, y, w, h]``, pixels) or a ``mask`` (a PNG, non-zero = object) makes it
removable (several entries of one name are merged).  Mentions: the object names as whole words,
case-insensitive, a final ``s``/``es`` (or ``y`` -> ``ies``) allowed, multi-word names matched as
phrases; no synonyms.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dleaf_analysis.sources.base import ImageSource, Mention, SourceError, stable_hash
from dleaf_analysis.sources.fill import FILLS, box_mask, remove_object


class JsonlSource(ImageSource):
    """Images listed in a JSON Lines file with their objects (see the module doc)."""

    kind = "jsonl"
    prompt = "Please describe this image in detail."
    max_new_tokens = 64

    def __init__(self, path: str | Path, fill: str = "blur") -> None:
        if fill not in FILLS:
            raise ValueError(f"unknown fill {fill!r}; choose one of {FILLS}")
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"annotated image list not found: {self.path}")
        self.fill = fill
        self.records: dict[str, dict] = {}
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{self.path}:{n} is not JSON: {e}") from None
            if not isinstance(r, dict) or "image" not in r or not isinstance(r.get("objects"), list):
                raise SourceError(f'{self.path}:{n}: each line needs "image" (a path) and "objects" (a list)')
            objs: dict[str, list[dict]] = {}
            for o in r["objects"]:
                o = {"name": o} if isinstance(o, str) else o
                if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                    raise SourceError(f'{self.path}:{n}: an object is a name or {{"name": ..., "box"|"mask": ...}}')
                if "box" in o and (not isinstance(o["box"], list) or len(o["box"]) != 4):
                    raise SourceError(f"{self.path}:{n}: a box is [x, y, width, height] in pixels")
                objs.setdefault(o["name"].lower().strip(), []).append(o)
            key = str(r.get("id", r["image"]))
            if key in self.records:
                raise SourceError(f"{self.path}:{n}: item {key!r} appears twice (give each line a distinct id)")
            img = self.path.parent / r["image"]
            if not img.is_file():
                raise SourceError(f"{self.path}:{n}: image not found: {img}")
            self.records[key] = {"image": img, "objects": objs}
        if not self.records:
            raise SourceError(f"{self.path} lists no images")
        super().__init__(list(self.records))
        names = sorted({o for r in self.records.values() for o in r["objects"]}, key=lambda s: (-len(s), s))
        alts = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in names)
        self._pattern = re.compile(rf"\b({alts})(s|es)?\b", re.IGNORECASE) if names else None
        self._plural = {n[:-1] + "ies": n for n in names if n.endswith("y")}

    def _rec(self, i: int) -> dict:
        return self.records[self._items[i]]

    def image(self, i: int):
        return Image.open(self._rec(i)["image"]).convert("RGB")

    def objects(self, i: int) -> frozenset[str]:
        return frozenset(self._rec(i)["objects"])

    def _all_object_sets(self):
        return [frozenset(r["objects"]) for r in self.records.values()]

    def removable(self, i: int) -> frozenset[str]:
        return frozenset(n for n, os_ in self._rec(i)["objects"].items() if any("box" in o or "mask" in o for o in os_))

    def mentions(self, text: str) -> list[Mention]:
        if self._pattern is None:
            return []
        out = []
        for m in self._pattern.finditer(text):
            name = re.sub(r"\s+", " ", m.group(1).lower())
            out.append(Mention(name, m.start(), m.end(), m.group(0)))
        for plural, name in self._plural.items():
            out += [Mention(name, m.start(), m.end(), m.group(0))
                    for m in re.finditer(rf"\b{re.escape(plural)}\b", text, re.IGNORECASE)]
        return sorted(out, key=lambda m: m.start)

    def mask(self, i: int, obj: str) -> np.ndarray:
        rec = self._rec(i)
        size = Image.open(rec["image"]).size
        m = np.zeros((size[1], size[0]), bool)
        got = False
        for o in rec["objects"].get(obj, []):
            if "mask" in o:
                arr = np.asarray(Image.open(self.path.parent / o["mask"]).convert("L")) > 0
                if arr.shape != m.shape:
                    raise SourceError(f"mask {o['mask']} is {arr.shape[::-1]} px, its image {size}")
                m |= arr
                got = True
            elif "box" in o:
                m |= box_mask(m.shape, o["box"])
                got = True
        if not got:
            raise SourceError(f"item {self._items[i]!r} has no box or mask for {obj!r}: it cannot be removed")
        return m

    def counterfactual(self, i: int, obj: str):
        return Image.fromarray(remove_object(np.asarray(self.image(i)), self.mask(i, obj), self.fill))

    def describe(self) -> dict:
        recs = {k: {"image": str(r["image"]), "objects": r["objects"]} for k, r in self.records.items()}
        return {"kind": "jsonl", "file": str(self.path.resolve()), "fill": self.fill, "records_hash": stable_hash(recs)}
