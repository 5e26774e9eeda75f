"""A user's annotated images as an image source: a JSON Lines file, one image per line::

    {"image": "photos/001.jpg", "objects": ["dog", {"name": "frisbee", "box": [x, y, w, h]},
                                            {"name": "person", "mask": "masks/001-person.png"}]}

``image`` and ``mask`` paths are relative to the file's folder; an optional ``"id"`` names the
item (default: the image path).  An object given as a plain name is ground truth but cannot be
removed; a ``box`` (COCO ``[x, y, w, h]``, pixels) or a ``mask`` (a PNG, non-zero = object) makes it
removable (several entries of one name are merged).  Mentions: the object names as whole words,
case-insensitive, a final ``s``/``es`` (or ``y`` -> ``ies``) allowed, multi-word names matched as
phrases; no synonyms.

Every line is checked when the file is read, before any compute: no unknown keys (a ``"boxes"``
typo is refused, not ignored), the image readable, a box 4 numbers with width and height > 0
covering pixels of the image, a mask readable, of the image's size and not all zero.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dleaf_analysis.sources.base import ImageSource, Mention, SourceError, stable_hash
from dleaf_analysis.sources.fill import FILLS, box_mask, remove_object


RECORD_KEYS = ("image", "objects", "id")
OBJECT_KEYS = ("name", "box", "mask")


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
            key, rec = self._record(n, r)
            if key in self.records:
                raise SourceError(f"{self.path}:{n}: item {key!r} appears twice (give each line a distinct id)")
            self.records[key] = rec
        if not self.records:
            raise SourceError(f"{self.path} lists no images")
        super().__init__(list(self.records))
        names = sorted({o for r in self.records.values() for o in r["objects"]}, key=lambda s: (-len(s), s))
        alts = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in names)
        self._pattern = re.compile(rf"\b({alts})(s|es)?\b", re.IGNORECASE) if names else None
        self._plural = {n[:-1] + "ies": n for n in names if n.endswith("y")}

    # -- validation (every record, at construction: before any compute) ---------------------------
    def _error(self, n: int, what: str) -> SourceError:
        return SourceError(f"{self.path}:{n}: {what}")

    def _record(self, n: int, r) -> tuple[str, dict]:
        """``(key, record)`` of line ``n`` after checking every key, object, box, mask and the image."""
        if not isinstance(r, dict) or "image" not in r or not isinstance(r.get("objects"), list):
            raise self._error(n, 'each line needs "image" (a path) and "objects" (a list)')
        unknown = sorted(set(r) - set(RECORD_KEYS))
        if unknown:
            raise self._error(n, f"unknown key {unknown[0]!r} (valid keys of a line: {', '.join(RECORD_KEYS)}); "
                                 "fix or remove it")
        if not isinstance(r["image"], str) or not r["image"].strip():
            raise self._error(n, f'"image" must be a path relative to {self.path.parent}, got {r["image"]!r}')
        if "id" in r and (isinstance(r["id"], bool) or not isinstance(r["id"], (str, int)) or r["id"] == ""):
            raise self._error(n, f'"id" must be a non-empty string or an integer, got {r["id"]!r}')
        key = str(r.get("id", r["image"]))
        img = self.path.parent / r["image"]
        if not img.is_file():
            raise self._error(n, f"item {key!r}: image not found: {img}")
        size = self._image_size(n, key, img)
        objs: dict[str, list[dict]] = {}
        for o in r["objects"]:
            o = {"name": o} if isinstance(o, str) else o
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise self._error(n, f'item {key!r}: an object is a name or {{"name": ..., "box"|"mask": ...}}, '
                                     f"got {str(o)[:60]}")
            name = o["name"].lower().strip()
            if not name:
                raise self._error(n, f"item {key!r}: an object has an empty name")
            where = f"item {key!r}, object {name!r}"
            unknown = sorted(set(o) - set(OBJECT_KEYS))
            if unknown:
                raise self._error(n, f"{where}: unknown key {unknown[0]!r} (valid keys of an object: "
                                     f"{', '.join(OBJECT_KEYS)}); fix or remove it")
            if "box" in o and "mask" in o:
                raise self._error(n, f"{where}: give a box or a mask, not both (two entries of one name are merged)")
            if "box" in o:
                self._check_box(n, where, o["box"], size)
            if "mask" in o:
                self._check_mask(n, where, o["mask"], size)
            objs.setdefault(name, []).append(o)
        return key, {"image": img, "objects": objs}

    def _image_size(self, n: int, key: str, img: Path) -> tuple[int, int]:
        """``(width, height)`` read from the header (nothing decoded), after ``verify``."""
        try:
            with Image.open(img) as im:
                size = im.size
                im.verify()
        except Exception as e:
            raise self._error(n, f"item {key!r}: {img} is not a readable image ({type(e).__name__}: {e}); "
                                 "replace the file or remove the line") from None
        return size

    def _check_box(self, n: int, where: str, box, size: tuple[int, int]) -> None:
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise self._error(n, f"{where}: a box is 4 numbers [x, y, width, height] in pixels, got {box!r}")
        x, y, w, h = box
        W, H = size
        if w <= 0 or h <= 0:
            raise self._error(n, f"{where}: box {box} has width {w} and height {h}; both must be > 0 "
                                 "([x, y, width, height] in pixels)")
        xs, ys = np.arange(W) + 0.5, np.arange(H) + 0.5  # box_mask's rule: the pixels whose centres fall inside
        if not (((xs >= x) & (xs <= x + w)).any() and ((ys >= y) & (ys <= y + h)).any()):
            raise self._error(n, f"{where}: box {box} covers no pixel of its {W}x{H} image; a counterfactual would "
                                 "remove nothing (give [x, y, width, height] in the image's pixels)")

    def _check_mask(self, n: int, where: str, mask, size: tuple[int, int]) -> None:
        if not isinstance(mask, str) or not mask.strip():
            raise self._error(n, f"{where}: a mask is the path of a PNG relative to {self.path.parent}, got {mask!r}")
        p = self.path.parent / mask
        if not p.is_file():
            raise self._error(n, f"{where}: mask not found: {p}")
        try:
            with Image.open(p) as im:
                msize = im.size
                im.verify()
            with Image.open(p) as im:  # verify() leaves the file unusable: reopen to read the pixels
                arr = np.asarray(im.convert("L"))
        except Exception as e:
            raise self._error(n, f"{where}: mask {p} is not a readable image ({type(e).__name__}: {e}); "
                                 "replace the file") from None
        if msize != size:
            raise self._error(n, f"{where}: mask {p.name} is {msize[0]}x{msize[1]} px but its image is "
                                 f"{size[0]}x{size[1]}; a mask has its image's size")
        if not arr.any():
            raise self._error(n, f"{where}: mask {p.name} is empty (all zero); a counterfactual would remove "
                                 "nothing (non-zero pixels mark the object)")

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
