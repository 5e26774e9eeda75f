"""The synthetic scene world's frozen splits as an image source (exact ground truth; the
counterfactual re-renders the scene without the object, so it is exact too)."""

from __future__ import annotations

import re

from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_NEW_TOKENS
from dleaf_analysis.scenes import Split, load_split, render
from dleaf_analysis.sources.base import ImageSource, Mention, SourceError

COCO_HINT = ("use a COCO source instead (--coco-images DIR --coco-annotations FILE [--image-ids FILE]) or your own "
             "annotated images (--images-jsonl FILE)")


class SceneSource(ImageSource):
    """The images of a frozen scene split (``dev``, ``test``, ``test-partner-absent``, ...)."""

    kind = "scene"
    prompt = DEFAULT_CAPTION_PROMPT
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS

    def __init__(self, split: Split) -> None:
        super().__init__(range(len(split)))
        self.split = split
        self.world = split.world
        self._words = split.world.object_words  # singular and plural -> class

    @classmethod
    def load(cls, name: str, limit: int | None = None) -> "SceneSource":
        return cls(load_split(name, limit=limit))

    @property
    def name(self) -> str:
        return self.split.name

    @property
    def classes(self) -> list[str]:
        return list(self.world.classes)

    def scene(self, i: int):
        return self.split.scenes[self._items[i]]

    def image(self, i: int):
        return self.split.image(self._items[i])

    def objects(self, i: int) -> frozenset[str]:
        return self.scene(i).name_set

    def removable(self, i: int) -> frozenset[str]:
        return self.scene(i).name_set

    def counterfactual(self, i: int, obj: str):
        return render(self.world, self.scene(i).without(obj))

    def mentions(self, text: str) -> list[Mention]:
        # the embedded tokenizer's words (as evaluation.chair.words), with their character spans
        return [Mention(self._words[m.group(0).lower()], m.start(), m.end(), m.group(0))
                for m in re.finditer(r"\w+|[^\w\s]", text) if m.group(0).lower() in self._words]

    def cue(self, i: int, obj: str) -> str | None:
        """A present strong partner of ``obj`` (the world's co-occurrence rule), else a present
        object of its group (first by name), else ``None``."""
        present = self.objects(i)
        partners = [p for p in self.world.partners.get(obj, []) if p in present]
        g = self.world.group_of(obj)
        group = [o for o in sorted(present) if g is not None and self.world.group_of(o) == g]
        return (partners or group or [None])[0]

    def chair_details(self, captions):
        from dleaf_analysis.evaluation.chair import chair_details

        return chair_details(captions, self.object_sets(), self.world.object_words)

    def key(self, i: int) -> str:
        """``split/index``: unique across the scene world's splits."""
        return f"{self.split.name}/{self._items[i]}"

    def describe(self) -> dict:
        return {"kind": "scene", "split": self.split.name, "split_hash": self.split.annotations_hash}

    def pope_questions(self, variants, seed: int = 0):
        """The scene world's POPE questions (random / popular / adversarial negatives from the train
        split's statistics), on this selection's images."""
        import pandas as pd

        from dleaf_analysis.scenes import pope_questions
        from dleaf_analysis.scenes.splits import Split, train_object_stats

        sel = Split(self.split.name, self.split.definition, self.world, [self.scene(i) for i in range(len(self))])
        frames = []
        for v in variants:
            q = pope_questions(sel, v, train_object_stats(), seed=seed).rename(columns={"image": "item"})
            q["key"] = [f"pope:{v}:{self.key(i)}:{o}" for i, o in zip(q["item"], q["object"])]
            frames.append(q)
        return pd.concat(frames, ignore_index=True)

    def check_model(self, lm) -> None:
        """The scene world's class names must be single tokens of the model's vocabulary."""
        tok = lm.tokenizer
        if tok is None:
            raise SourceError("this model has no tokenizer; " + COCO_HINT)
        unk = tok.unk_token_id
        vocab = tok.get_vocab()
        missing = [c for c in self.world.classes if c not in vocab or vocab[c] == unk]
        if missing:
            raise SourceError(
                f"the scene world's class names are not tokens of this model's vocabulary ({len(missing)} of "
                f"{len(self.world.classes)}, e.g. {missing[:3]}): its captions of scene images cannot be scored; "
                + COCO_HINT)
