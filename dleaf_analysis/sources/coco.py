"""COCO 2014 as an image source: a local images folder, the instances annotations (with
segmentations), CHAIR's synonym and two-word tables (``data/coco/``) and an optional image-id list.

Ground truth (``ground_truth``): ``"chair"`` (default) is CHAIR's own ground truth (instance
categories and objects named in the human captions, ``data/coco/gt_objects_coco2014_all.json.gz``)
for images it covers and the instance categories for the others; ``"instances"`` is the instance
categories only.  Mentions are read with CHAIR's matcher (synonyms, two-word objects,
lemmatisation).  The counterfactual removes every instance of an object by filling its
segmentation masks (its boxes where an instance has no segmentation) -- see
:mod:`dleaf_analysis.sources.fill` for what that does and does not control for.
"""

from __future__ import annotations

import contextlib
import io
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from dleaf_analysis.sources.base import ImageSource, Mention, SourceError, stable_hash
from dleaf_analysis.sources.fill import FILLS, box_mask, remove_object

GROUND_TRUTHS = ("chair", "instances")
CHAIR_PROMPT = "Please describe this image in detail."  # OPERA's chair_eval.py


def read_image_ids(path: str | Path) -> list[int]:
    """Image ids from a text file (whitespace- or comma-separated integers) or a captions file
    (JSON/JSON Lines records with ``image_id``)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"image-id list not found: {path}")
    text = path.read_text()
    if path.suffix in (".json", ".jsonl"):
        from dleaf_analysis.evaluation.coco_chair import read_captions

        return list(dict.fromkeys(read_captions(path)["image_id"].tolist()))
    try:
        return list(dict.fromkeys(int(x) for x in text.replace(",", " ").split()))
    except ValueError:
        raise SourceError(f"{path}: an image-id list holds integers separated by spaces, commas or newlines") from None


class CocoSource(ImageSource):
    """COCO images with their instance annotations (see the module doc)."""

    kind = "coco"
    prompt = CHAIR_PROMPT
    max_new_tokens = 64

    def __init__(self, images_dir: str | Path, annotations: str | Path, image_ids: list[int] | str | Path | None = None,
                 ground_truth: str = "chair", fill: str = "blur", tagger: str = "perceptron") -> None:
        from pycocotools.coco import COCO

        if ground_truth not in GROUND_TRUTHS:
            raise ValueError(f"unknown ground truth {ground_truth!r}; choose one of {GROUND_TRUTHS}")
        if fill not in FILLS:
            raise ValueError(f"unknown fill {fill!r}; choose one of {FILLS}")
        self.images_dir, self.annotations = Path(images_dir), Path(annotations)
        if not self.images_dir.is_dir():
            raise SourceError(f"COCO images folder not found: {self.images_dir} (e.g. the unpacked val2014/)")
        if not self.annotations.is_file():
            raise SourceError(f"COCO annotations not found: {self.annotations} (e.g. annotations/instances_val2014.json)")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(self.annotations))
        except Exception as e:  # json errors, missing keys
            raise SourceError(f"{self.annotations} is not a COCO instances file: {e}") from None
        if isinstance(image_ids, (str, Path)):
            image_ids = read_image_ids(image_ids)
        ids = list(dict.fromkeys(int(i) for i in image_ids)) if image_ids is not None else sorted(self.coco.imgs)
        unknown = [i for i in ids if i not in self.coco.imgs]
        if unknown:
            raise SourceError(f"{len(unknown)} image ids are not in {self.annotations.name} (e.g. {unknown[:3]}); "
                              "give ids of that annotation file (train2014 ids need instances_train2014.json)")
        missing = [i for i in ids if not self.path(i).is_file()]
        if missing:
            raise SourceError(f"{len(missing)} of {len(ids)} images are not in {self.images_dir} (e.g. "
                              f"{self.path(missing[0]).name}); pass --image-ids with the images you have")
        super().__init__(ids)
        self.ground_truth, self.fill, self.tagger = ground_truth, fill, tagger

    @cached_property
    def chair(self):
        from dleaf_analysis.evaluation.coco_chair import CocoChair

        return CocoChair.load(tagger=self.tagger)

    def _canonical(self, name: str) -> str:
        return self.chair.tables["inverse_synonym_dict"].get(name, name)

    def path(self, image_id: int) -> Path:
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def image(self, i: int):
        return Image.open(self.path(self._items[i])).convert("RGB")

    def _instances(self, image_id: int) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for a in self.coco.imgToAnns.get(image_id, []):
            out.setdefault(self._canonical(self.coco.cats[a["category_id"]]["name"]), []).append(a)
        return out

    def removable(self, i: int) -> frozenset[str]:
        return frozenset(self._instances(self._items[i]))

    def objects(self, i: int) -> frozenset[str]:
        image_id = self._items[i]
        inst = frozenset(self._instances(image_id))
        if self.ground_truth == "chair":
            return frozenset(self.chair.gt.get(image_id, inst))
        return inst

    def _all_object_sets(self):
        return [frozenset(self._instances(i)) for i in self.coco.imgs]

    def mentions(self, text: str) -> list[Mention]:
        return [Mention(obj, a, b, text[a:b]) for obj, a, b in self.chair.mentions(text)]

    def mask(self, i: int, obj: str) -> np.ndarray:
        """``bool [H, W]``: the union of ``obj``'s instance masks (boxes where there is no segmentation)."""
        image_id = self._items[i]
        anns = self._instances(image_id).get(obj)
        if not anns:
            raise SourceError(f"image {image_id} has no annotated {obj!r} to remove")
        info = self.coco.imgs[image_id]
        m = np.zeros((info["height"], info["width"]), bool)
        for a in anns:
            m |= self.coco.annToMask(a).astype(bool) if a.get("segmentation") else box_mask(m.shape, a["bbox"])
        return m

    def counterfactual(self, i: int, obj: str):
        img = np.asarray(self.image(i))
        m = self.mask(i, obj)
        if m.shape != img.shape[:2]:
            raise SourceError(f"{self.path(self._items[i]).name} is {img.shape[1]}x{img.shape[0]} px but its "
                              f"annotations say {m.shape[1]}x{m.shape[0]}")
        return Image.fromarray(remove_object(img, m, self.fill))

    def describe(self) -> dict:
        gt = [(i, sorted(self.objects(k))) for k, i in enumerate(self._items)]
        return {"kind": "coco", "annotations": str(self.annotations.resolve()), "images_dir": str(self.images_dir.resolve()),
                "ground_truth": self.ground_truth, "fill": self.fill, "tagger": self.tagger, "gt_hash": stable_hash(gt)}
