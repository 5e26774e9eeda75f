"""COCO 2014 as an image source: a local images folder, the instances annotations (with
segmentations), CHAIR's synonym and two-word tables (``data/coco/``) and an optional image-id list.

Without an annotations file (``annotations=None``: captioning and POPE only) the ground truth is
CHAIR's table and nothing can be removed.  POPE's question files (``data/coco/pope/``, or a file
of your own) supply the source's POPE questions (:meth:`CocoSource.pope_questions`).

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
import json
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from dleaf_analysis.sources.base import ImageSource, Mention, SourceError, stable_hash
from dleaf_analysis.sources.coco_chair import COCO_DIR
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
        from dleaf_analysis.sources.coco_chair import read_captions

        return list(dict.fromkeys(read_captions(path)["image_id"].tolist()))
    try:
        return list(dict.fromkeys(int(x) for x in text.replace(",", " ").split()))
    except ValueError:
        raise SourceError(f"{path}: an image-id list holds integers separated by spaces, commas or newlines") from None


POPE_DIR = COCO_DIR / "pope"
POPE_VERSIONS = {"current": POPE_DIR, "opera": POPE_DIR / "opera_snapshot"}


def coco_image_id(name: str | int) -> int:
    """``COCO_val2014_000000310196.jpg`` (a POPE file name) or an id -> the integer image id."""
    if isinstance(name, (int, np.integer)):
        return int(name)
    stem = Path(str(name)).stem
    try:
        return int(stem.rsplit("_", 1)[-1])
    except ValueError:
        raise SourceError(f"cannot read a COCO image id from {name!r} (expected e.g. COCO_val2014_000000310196.jpg)") from None


def load_pope_questions(variant: str = "adversarial", version: str = "current", path: str | Path | None = None):
    """POPE question file (JSON Lines: question_id, image, text, label) as a DataFrame;
    ``df.attrs["source"]`` says which variant, version and file it is."""
    import pandas as pd

    from dleaf_analysis.sources.coco_chair import CocoDataError

    explicit = path is not None
    if path is None:
        if version not in POPE_VERSIONS:
            raise SourceError(f"unknown POPE version {version!r}; choose one of {sorted(POPE_VERSIONS)}")
        path = POPE_VERSIONS[version] / f"coco_pope_{variant}.json"
    path = Path(path)
    if not path.is_file():
        raise CocoDataError(f"POPE question file not found: {path} (variants: random, popular, adversarial)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise CocoDataError(f"{path}:{n} is not JSON: {e}") from None
        missing = {"question_id", "image", "text", "label"} - set(r) if isinstance(r, dict) else {"a JSON object"}
        if missing or r["label"] not in ("yes", "no"):
            raise CocoDataError(f"{path}:{n}: a POPE question needs question_id, image, text and label yes/no "
                                f"(missing {sorted(missing)})" if missing else f"{path}:{n}: label must be yes or no")
        rows.append(r)
    if not rows:
        raise CocoDataError(f"{path} holds no POPE questions")
    df = pd.DataFrame(rows)
    df.attrs["source"] = {"variant": variant, "version": version, "file": str(path.resolve())} if not explicit \
        else {"variant": None, "version": None, "file": str(path.resolve())}
    return df


def validate_instances(path: Path) -> None:
    """Check a COCO instances file before it is used: the keys it must have, their types, and every
    annotation's box or segmentation (inside its image, non-empty).  One line per failure names
    the file, the item and what to do."""
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{path} does not parse as JSON: {e}") from None
    if not isinstance(d, dict):
        raise SourceError(f"{path} is not a COCO instances file (a JSON object with images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(d.get(key), list):
            raise SourceError(f"{path} has no {key!r} list: a COCO instances file (e.g. instances_val2014.json) has "
                              "images, annotations and categories")
    sizes = {}
    for im in d["images"]:
        if not isinstance(im, dict) or not {"id", "file_name", "width", "height"} <= set(im):
            raise SourceError(f"{path}: an image entry needs id, file_name, width and height; got {str(im)[:80]}")
        sizes[im["id"]] = (im["width"], im["height"])
    cats = {c.get("id") for c in d["categories"] if isinstance(c, dict) and "name" in c}
    if len(cats) != len(d["categories"]):
        raise SourceError(f"{path}: every category needs an id and a name")
    for a in d["annotations"]:
        aid = a.get("id", "?") if isinstance(a, dict) else "?"
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            raise SourceError(f"{path}: annotation {aid} needs image_id and category_id")
        if a["image_id"] not in sizes:
            raise SourceError(f"{path}: annotation {aid} refers to image {a['image_id']}, which is not in its images")
        if a["category_id"] not in cats:
            raise SourceError(f"{path}: annotation {aid} has category {a['category_id']}, which is not in its categories")
        seg, box = a.get("segmentation"), a.get("bbox")
        if not seg and box is None:
            raise SourceError(f"{path}: annotation {aid} has neither a segmentation nor a bbox; it cannot be removed "
                              "in a counterfactual (add one, or drop the annotation)")
        if seg:
            _check_segmentation(path, aid, seg, sizes[a["image_id"]])
        if box is not None:
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise SourceError(f"{path}: annotation {aid}: bbox must be [x, y, width, height], got {box}")
            x, y, w, h = box
            W, H = sizes[a["image_id"]]
            if w <= 0 or h <= 0 or x >= W or y >= H or x + w <= 0 or y + h <= 0:
                raise SourceError(f"{path}: annotation {aid}: bbox {box} is empty or outside its {W}x{H} image; "
                                  "a counterfactual would remove nothing")


def _check_segmentation(path: Path, aid, seg, size: tuple) -> None:
    """A segmentation is polygons (flat lists of x, y pairs) reaching into the image, or an RLE
    (``counts`` and ``size`` = the image's ``[height, width]``).  A polygon inside the image that
    covers no pixel (e.g. fewer than 3 points) is refused when its mask is made (:meth:`CocoSource.mask`)."""
    W, H = size
    if isinstance(seg, dict):
        if "counts" not in seg or list(seg.get("size", ())) != [H, W]:
            raise SourceError(f"{path}: annotation {aid}: an RLE segmentation needs counts and size [{H}, {W}] (its "
                              f"image's height and width), got size {seg.get('size')}")
        return
    if not isinstance(seg, list):
        raise SourceError(f"{path}: annotation {aid}: segmentation must be a list of polygons or an RLE, got {str(seg)[:60]}")
    for poly in seg:
        if not (isinstance(poly, list) and len(poly) >= 2 and len(poly) % 2 == 0
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly)):
            raise SourceError(f"{path}: annotation {aid}: a polygon is a list of coordinates [x1, y1, x2, y2, ...], "
                              f"got {str(poly)[:60]}")
        xs, ys = poly[0::2], poly[1::2]
        if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= W or min(ys) >= H:
            raise SourceError(f"{path}: annotation {aid}: its polygon lies outside its {W}x{H} image; a counterfactual "
                              "would remove nothing")


class CocoSource(ImageSource):
    """COCO images with their instance annotations (see the module doc)."""

    kind = "coco"
    prompt = CHAIR_PROMPT
    max_new_tokens = 64

    def __init__(self, images_dir: str | Path, annotations: str | Path | None = None,
                 image_ids: list[int] | str | Path | None = None, ground_truth: str = "chair", fill: str = "blur",
                 tagger: str = "perceptron", pope_version: str = "current", pope_file: str | Path | None = None,
                 skip_missing: bool = False) -> None:
        if ground_truth not in GROUND_TRUTHS:
            raise ValueError(f"unknown ground truth {ground_truth!r}; choose one of {GROUND_TRUTHS}")
        if fill not in FILLS:
            raise ValueError(f"unknown fill {fill!r}; choose one of {FILLS}")
        self.images_dir = Path(images_dir)
        self.annotations = Path(annotations) if annotations is not None else None
        self.pope_version, self.pope_file = pope_version, Path(pope_file) if pope_file is not None else None
        if not self.images_dir.is_dir():
            raise SourceError(f"COCO images folder not found: {self.images_dir} (e.g. the unpacked val2014/)")
        self.coco = self._load_annotations(self.annotations) if self.annotations is not None else None
        if isinstance(image_ids, (str, Path)):
            image_ids = read_image_ids(image_ids)
        if image_ids is None and self.coco is None:
            raise SourceError("a COCO source without --coco-annotations needs --image-ids (or POPE's question file)")
        ids = list(dict.fromkeys(int(i) for i in image_ids)) if image_ids is not None else sorted(self.coco.imgs)
        if not ids:
            raise SourceError("the image-id list is empty: give at least one COCO image id")
        if self.coco is not None:
            unknown = [i for i in ids if i not in self.coco.imgs]
            if unknown:
                raise SourceError(f"{len(unknown)} image ids are not in {self.annotations.name} (e.g. {unknown[:3]}); "
                                  "give ids of that annotation file (train2014 ids need instances_train2014.json)")
        missing = [i for i in ids if not self.path(i).is_file()]
        self.missing = missing
        if missing and not skip_missing:
            raise SourceError(f"{len(missing)} of {len(ids)} images are not in {self.images_dir} (e.g. "
                              f"{self.path(missing[0]).name}); pass --image-ids with the images you have")
        ids = [i for i in ids if i not in set(missing)]
        if not ids:
            raise SourceError(f"none of the {len(missing)} images is in {self.images_dir}; check the folder")
        for i in ids:
            self._verify(i)
        super().__init__(ids)
        self.ground_truth, self.fill, self.tagger = ground_truth, fill, tagger

    def _verify(self, image_id: int) -> None:
        """Refuse an image file that does not open as an image (read from its header, not decoded)
        or whose size is not its annotation's."""
        p = self.path(image_id)
        try:
            with Image.open(p) as im:
                size = im.size
                im.verify()
        except Exception as e:
            raise SourceError(f"{p} is not a readable image ({type(e).__name__}: {e}); replace it (re-download or "
                              "re-extract the images) or leave its id out of --image-ids") from None
        if self.coco is not None:
            info = self.coco.imgs[image_id]
            if tuple(size) != (info["width"], info["height"]):
                raise SourceError(f"{p} is {size[0]}x{size[1]} px but {self.annotations.name} says "
                                  f"{info['width']}x{info['height']}; the image or the annotation file is not the right one")

    @staticmethod
    def _load_annotations(path: Path):
        from pycocotools.coco import COCO

        if not path.is_file():
            raise SourceError(f"COCO annotations not found: {path} (e.g. annotations/instances_val2014.json)")
        validate_instances(path)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return COCO(str(path))
        except Exception as e:  # json errors, missing keys
            raise SourceError(f"{path} is not a COCO instances file: {e}") from None

    @cached_property
    def chair(self):
        from dleaf_analysis.sources.coco_chair import CocoChair

        return CocoChair.load(tagger=self.tagger)

    def _canonical(self, name: str) -> str:
        return self.chair.tables["inverse_synonym_dict"].get(name, name)

    def path(self, image_id: int) -> Path:
        if self.coco is not None and image_id in self.coco.imgs:
            return self.images_dir / self.coco.imgs[image_id]["file_name"]
        return self.images_dir / f"COCO_val2014_{int(image_id):012d}.jpg"

    def image(self, i: int):
        return Image.open(self.path(self._items[i])).convert("RGB")

    def _instances(self, image_id: int) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        if self.coco is None:
            return out
        for a in self.coco.imgToAnns.get(image_id, []):
            out.setdefault(self._canonical(self.coco.cats[a["category_id"]]["name"]), []).append(a)
        return out

    def removable(self, i: int) -> frozenset[str]:
        return frozenset(self._instances(self._items[i]))

    def objects(self, i: int) -> frozenset[str]:
        image_id = self._items[i]
        inst = frozenset(self._instances(image_id))
        if self.ground_truth == "chair":
            if self.coco is None and image_id not in self.chair.gt:
                raise SourceError(f"image {image_id} is not in CHAIR's ground truth; give --coco-annotations for it")
            return frozenset(self.chair.gt.get(image_id, inst))
        return inst

    def _all_object_sets(self):
        if self.coco is None:
            return [frozenset(self.chair.gt.get(i, ())) for i in self._items]
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
            seg = a.get("segmentation")
            if isinstance(seg, list):  # a polygon of fewer than 3 points has no area (and pycocotools fails on it)
                seg = [p for p in seg if len(p) >= 6]
                if seg:
                    m |= self.coco.annToMask({**a, "segmentation": seg}).astype(bool)
            elif seg:
                m |= self.coco.annToMask(a).astype(bool)
            if not a.get("segmentation"):
                m |= box_mask(m.shape, a["bbox"])
        if not m.any():
            what = "polygon" if any(a.get("segmentation") for a in anns) else "box"
            raise SourceError(f"{self.annotations}: image {image_id}: the {what} of {obj!r} (annotation "
                              f"{', '.join(str(a.get('id', '?')) for a in anns)}) covers no pixel; a counterfactual "
                              "would remove nothing (fix the annotation or drop it)")
        return m

    def counterfactual(self, i: int, obj: str):
        img = np.asarray(self.image(i))
        m = self.mask(i, obj)
        if m.shape != img.shape[:2]:
            raise SourceError(f"{self.path(self._items[i]).name} is {img.shape[1]}x{img.shape[0]} px but its "
                              f"annotations say {m.shape[1]}x{m.shape[0]}")
        return Image.fromarray(remove_object(img, m, self.fill))

    def describe(self) -> dict:
        whole = self.parent  # a shard describes the source it was taken from (shards of one run agree)
        gt = [(i, sorted(whole.objects(k))) for k, i in enumerate(whole._items)]
        return {"kind": "coco", "annotations": str(self.annotations.resolve()) if self.annotations else None,
                "images_dir": str(self.images_dir.resolve()), "ground_truth": self.ground_truth, "fill": self.fill,
                "tagger": self.tagger, "gt_hash": stable_hash(gt), "skipped_missing_images": len(whole.missing)}

    # -- POPE -----------------------------------------------------------------------------------
    @classmethod
    def from_pope(cls, images_dir: str | Path, variant: str = "adversarial", version: str = "current",
                  questions: str | Path | None = None, **kw) -> "CocoSource":
        """The images of a POPE question file (those missing from ``images_dir`` are skipped and
        counted in ``source.missing``)."""
        qs = load_pope_questions(variant, version, questions)
        ids = list(dict.fromkeys(coco_image_id(x) for x in qs["image"]))
        src = cls(images_dir, image_ids=ids, pope_version=version, pope_file=questions, skip_missing=True, **kw)
        src._pope_variant = variant
        return src

    def pope_questions(self, variants, seed: int = 0):
        """POPE's own questions (the shipped files of ``pope_version``, or ``pope_file``) on this
        selection's images; ``variants`` are the files to read (``pope_file``: one file)."""
        import pandas as pd

        pos = {image_id: i for i, image_id in enumerate(self._items)}
        frames = []
        for v in ([getattr(self, "_pope_variant", "file")] if self.pope_file is not None else variants):
            q = load_pope_questions(v, self.pope_version, self.pope_file)
            q["image_id"] = [coco_image_id(x) for x in q["image"]]
            q = q[q["image_id"].isin(pos)]
            frames.append(pd.DataFrame({"item": q["image_id"].map(pos).to_numpy(), "variant": v,
                                        "object": q["text"].to_numpy(), "label": q["label"].to_numpy(),
                                        "question": q["text"].to_numpy(),
                                        "key": [f"pope:{v}:{qid}" for qid in q["question_id"]]}))
        return pd.concat(frames, ignore_index=True)
