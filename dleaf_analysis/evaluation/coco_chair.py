"""CHAIR of COCO captions (Rohrbach et al. 2018): the scores, with bootstrap CIs, from CHAIR's
matcher (:mod:`dleaf_analysis.sources.coco_chair`, which sits below the image sources)."""

from __future__ import annotations

import pandas as pd

from dleaf_analysis.evaluation.chair import chair_summary
from dleaf_analysis.sources.coco_chair import (COCO_DIR, TAGGERS, CocoChair, CocoDataError, NLPResourceError,  # noqa: F401
                                               load_ground_truth, read_captions)


def chair_score(captions: pd.DataFrame, scorer: CocoChair, n_resamples: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, details)``: CHAIR_s, CHAIR_i, recall (percent), length (words), bootstrap CIs.
    Captions of images not in the ground truth are skipped and counted in ``summary.attrs``; with no
    caption of a known image left to score, :class:`CocoDataError`."""
    if not {"image_id", "caption"} <= set(captions.columns):
        raise CocoDataError(f"captions need image_id and caption columns, got {sorted(map(str, captions.columns))}")
    known = captions["image_id"].isin(scorer.gt.keys())
    if not known.any():
        unknown = captions.loc[~known, "image_id"].tolist()
        n_bad = captions.attrs.get("skipped_missing_keys", 0)
        held = (f"{len(captions) + n_bad} caption records, {len(unknown)} of images not in the ground truth"
                + (f" (e.g. {unknown[:3]})" if unknown else "") + f", {n_bad} without an image id or caption"
                if len(captions) + n_bad else "the file holds no caption records")
        raise CocoDataError(f"no caption of a known COCO image: {held}; give captions of COCO 2014 images (check "
                            "--image-id-key and --caption-key, or --gt)")
    details = scorer.details(captions[known])
    summary = chair_summary(details, n_resamples=n_resamples, seed=seed)  # same statistics as on scenes
    summary.attrs.update({"skipped_unknown_image_ids": int((~known).sum()),
                          "skipped_missing_keys": captions.attrs.get("skipped_missing_keys", 0),
                          "hallucinated_mentions": int(details["n_hallucinated"].sum()),
                          "mentions": int(details["n_mentions"].sum()),
                          "tagger": scorer.tagger})
    return summary, details
