"""The image-source interface every study, tuning run, calibration and figure consumes.

A source is an ordered list of images with exact or annotated ground truth.  For item ``i`` it
gives the image, the ground-truth object set, a counterfactual image with one object removed,
the object that cues a hallucination, and (for any generated text) the object mentions with
their character spans.  Sources: :class:`~dleaf_analysis.sources.scene.SceneSource` (the
synthetic scene world), :class:`~dleaf_analysis.sources.coco.CocoSource` (COCO 2014 images and
instance annotations, matched with CHAIR's rules) and
:class:`~dleaf_analysis.sources.jsonl.JsonlSource` (a user's annotated folder).
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import pandas as pd

from dleaf_analysis.errors import DleafError

CUE_RULES = ("cooccurrence",)


class SourceError(DleafError, ValueError):
    """An image source that cannot be used as given; the message says what to do."""


@dataclass(frozen=True)
class Mention:
    """One object mention in a text: the ground-truth object it names and its characters
    ``text[start:end]`` (``word``, as written)."""

    object: str
    start: int
    end: int
    word: str


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ImageSource(ABC):
    """Images with ground truth (see the module doc).  Positions ``i`` index the source as
    selected (:meth:`limit`, :meth:`shard`); :meth:`key` is the item's stable identity."""

    kind: str = "source"
    prompt: str = "describe the image ."
    max_new_tokens: int = 32

    def __init__(self, items: Sequence) -> None:
        self._items = list(items)
        self._shard = (0, 1)

    # -- selection -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list:
        """The underlying item identifiers, in order."""
        return list(self._items)

    def key(self, i: int) -> str:
        """A stable identity of item ``i`` (results are keyed by it, so runs resume by item)."""
        return str(self._items[i])

    def _select(self, items: list) -> "ImageSource":
        new = copy.copy(self)
        new._items = items
        new.__dict__.pop("fingerprint", None)
        return new

    def limit(self, n: int | None) -> "ImageSource":
        """The first ``n`` items (all if ``None``)."""
        return self if n is None else self._select(self._items[:n])

    def shard(self, i: int, n: int) -> "ImageSource":
        """Every ``n``-th item starting at ``i`` (``0 <= i < n``)."""
        if not 0 <= i < n:
            raise SourceError(f"shard {i}/{n}: need 0 <= i < N")
        if self._shard != (0, 1):
            raise SourceError("this source is already a shard; shard the whole source instead")
        new = self._select(self._items[i::n])
        new._shard = (i, n)
        new._unsharded = self.fingerprint
        new._parent = self
        return new

    @property
    def shard_spec(self) -> tuple[int, int]:
        """``(i, n)``: this selection is shard ``i`` of ``n`` (``(0, 1)``: not sharded)."""
        return self._shard

    @property
    def parent(self) -> "ImageSource":
        """The unsharded source this shard was taken from (itself if not a shard)."""
        return getattr(self, "_parent", self)

    def record(self) -> dict:
        """What identifies the images of a run in its manifest: the description, a hash of the
        unsharded selection, the shard and the number of items."""
        return {**self.describe(), "hash": self.unsharded_fingerprint, "shard": list(self._shard),
                "n_items": len(self.parent)}

    def pope_questions(self, variants: Sequence[str], seed: int = 0) -> pd.DataFrame:
        """POPE questions on this source's images: one row per question with ``item`` (position in the
        source), ``key`` (stable), ``variant``, ``object``, ``label`` (yes/no) and ``question``."""
        raise SourceError(f"{type(self).__name__} has no POPE questions; POPE runs on a scene split or on COCO "
                          "with POPE's question files (dleaf pope-coco)")

    @property
    def unsharded_fingerprint(self) -> str:
        """:attr:`fingerprint` of the selection before :meth:`shard` (the same for every shard)."""
        return getattr(self, "_unsharded", None) or self.fingerprint

    def split_heldout(self, fraction: float) -> tuple["ImageSource", "ImageSource"]:
        """``(held_out, rest)``: the items whose ``sha256(key)`` ranks in the lowest ``fraction``
        (at least one) and the others, each in source order -- deterministic, disjoint, and
        independent of the order of the image list."""
        if not 0 < fraction < 1:
            raise SourceError(f"held-out fraction {fraction} must be in (0, 1)")
        n = max(1, round(fraction * len(self)))
        if n >= len(self):
            raise SourceError(f"{len(self)} images are too few to hold {n} out for tuning and evaluate on the rest")
        ranked = sorted(range(len(self)), key=lambda i: hashlib.sha256(self.key(i).encode()).hexdigest())
        held = set(ranked[:n])
        return (self._select([x for i, x in enumerate(self._items) if i in held]),
                self._select([x for i, x in enumerate(self._items) if i not in held]))

    # -- per item --------------------------------------------------------------------------------
    @abstractmethod
    def image(self, i: int):
        """The image of item ``i`` (PIL image, ``uint8 [H, W, 3]`` array, or file path)."""

    @abstractmethod
    def objects(self, i: int) -> frozenset[str]:
        """Ground-truth objects of item ``i`` (canonical names, as :meth:`mentions` returns them)."""

    @abstractmethod
    def mentions(self, text: str) -> list[Mention]:
        """Object mentions in ``text``, in order, repeats kept."""

    @abstractmethod
    def removable(self, i: int) -> frozenset[str]:
        """Objects of item ``i`` that :meth:`counterfactual` can remove (annotated with a mask or box)."""

    @abstractmethod
    def counterfactual(self, i: int, obj: str):
        """Item ``i``'s image with ``obj`` removed, every other pixel identical."""

    @abstractmethod
    def describe(self) -> dict:
        """What identifies the source in a manifest (kind, files, hashes)."""

    def object_word(self, obj: str) -> str:
        """How ``obj`` is written in a caption (the preferred alternative's text)."""
        return obj

    def check_model(self, lm) -> None:
        """Refuse a model that cannot express this source's objects (default: accept)."""

    # -- derived ---------------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """Hash of the description and the selected items."""
        return stable_hash({**self.describe(), "items": [str(x) for x in self._items]})

    def object_sets(self) -> list[frozenset[str]]:
        return [self.objects(i) for i in range(len(self))]

    @cached_property
    def cooccurrence(self) -> tuple[Counter, Counter]:
        """``(n(o), n(o, h))`` over every item of the *full* annotation set (not just the selection)."""
        single, pair = Counter(), Counter()
        for objs in self._all_object_sets():
            single.update(objs)
            pair.update((a, b) for a in objs for b in objs if a != b)
        return single, pair

    def _all_object_sets(self) -> list[frozenset[str]]:
        return self.object_sets()

    def cue(self, i: int, obj: str) -> str | None:
        """The removable present object that most predicts ``obj`` (highest ``n(o, obj) / n(o)``
        over the annotations; ties by name); ``None`` if no present object ever co-occurs with it."""
        single, pair = self.cooccurrence
        cands = sorted(o for o in self.removable(i) if o != obj and pair[(o, obj)] > 0)
        if not cands:
            return None
        return max(cands, key=lambda o: (pair[(o, obj)] / single[o], -cands.index(o)))

    def chair_details(self, captions: Sequence[str]) -> pd.DataFrame:
        """Per-caption CHAIR table of captions of items ``0..n-1`` (same columns as
        :func:`dleaf_analysis.evaluation.chair.chair_details`)."""
        from dleaf_analysis.evaluation.chair import words

        if len(captions) != len(self):
            raise ValueError(f"{len(captions)} captions for {len(self)} images")
        rows = []
        for i, cap in enumerate(captions):
            gt = set(self.objects(i))
            ment = [m.object for m in self.mentions(cap)]
            hall = [m for m in ment if m not in gt]
            covered = sorted(set(ment) & gt)
            rows.append({"item": i, "caption": cap, "gt_objects": sorted(gt), "mentioned": ment, "hallucinated": hall,
                         "covered": covered, "n_mentions": len(ment), "n_hallucinated": len(hall), "n_gt": len(gt),
                         "n_covered": len(covered), "n_words": len(words(cap))})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.describe().get('kind')})"
