"""CHAIR (Rohrbach et al. 2018) on the scene world, where it is exact: every object word is a
class name, and the ground truth is the scene's object set.

CHAIR_s = captions with at least one hallucinated object / captions;
CHAIR_i = hallucinated object mentions / object mentions (repeats counted, as in the original);
recall  = ground-truth objects mentioned / ground-truth objects.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from dleaf_analysis.evaluation.bootstrap import paired_difference, summary_table

CHAIR_METRICS = ("CHAIR_s", "CHAIR_i", "recall", "length")


def words(caption: str) -> list[str]:
    """Word tokens of a caption (the embedded tokenizer's split: words and punctuation)."""
    import re

    return re.findall(r"\w+|[^\w\s]", caption.lower())


def object_mentions(caption: str, vocabulary: Iterable[str] | Mapping[str, str]) -> list[str]:
    """Objects a caption mentions, in order, repeats kept.  ``vocabulary``: the object words, or a
    mapping from every object word (e.g. singular and plural) to its object."""
    vocab = dict(vocabulary) if isinstance(vocabulary, Mapping) else {w: w for w in vocabulary}
    return [vocab[w] for w in words(caption) if w in vocab]


def chair_details(captions: Sequence[str], ground_truth: Sequence[Iterable[str]],
                  vocabulary: Iterable[str] | Mapping[str, str]) -> pd.DataFrame:
    """Per-caption CHAIR table: mentions, hallucinated, covered ground truth and counts."""
    if len(captions) != len(ground_truth):
        raise ValueError(f"{len(captions)} captions but {len(ground_truth)} ground-truth sets")
    vocab = dict(vocabulary) if isinstance(vocabulary, Mapping) else list(vocabulary)
    rows = []
    for i, (cap, gt) in enumerate(zip(captions, ground_truth)):
        gt = set(gt)
        ment = object_mentions(cap, vocab)
        hall = [m for m in ment if m not in gt]
        covered = sorted(set(ment) & gt)
        rows.append({
            "item": i, "caption": cap, "gt_objects": sorted(gt), "mentioned": ment, "hallucinated": hall,
            "covered": covered, "n_mentions": len(ment), "n_hallucinated": len(hall),
            "n_gt": len(gt), "n_covered": len(covered), "n_words": len(words(cap)),
        })
    return pd.DataFrame(rows)


def _chair_columns(details: pd.DataFrame) -> dict[str, np.ndarray]:
    return {
        "any": (details["n_hallucinated"] > 0).to_numpy(float),
        "one": np.ones(len(details)),
        "hall": details["n_hallucinated"].to_numpy(float),
        "ment": details["n_mentions"].to_numpy(float),
        "cov": details["n_covered"].to_numpy(float),
        "gt": details["n_gt"].to_numpy(float),
        "len": details["n_words"].to_numpy(float),
    }


CHAIR_STATISTICS = {
    "CHAIR_s": lambda s: 100 * s["any"] / s["one"],
    "CHAIR_i": lambda s: 100 * s["hall"] / s["ment"],
    "recall": lambda s: 100 * s["cov"] / s["gt"],
    "length": lambda s: s["len"] / s["one"],
}


def chair_summary(details: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """CHAIR_s, CHAIR_i, recall (percent) and mean length, each with a bootstrap 95% CI."""
    return summary_table(_chair_columns(details), CHAIR_STATISTICS, n=len(details), n_resamples=n_resamples, seed=seed)


def chair_paired(base: pd.DataFrame, other: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap of ``other - base`` for every CHAIR metric, on the same images (points;
    e.g. a method against greedy).  The rows of both detail tables must be the same images."""
    if "image" in base and "image" in other and list(base["image"]) != list(other["image"]):
        raise ValueError("the two CHAIR tables are not on the same images in the same order")
    return paired_difference(_chair_columns(base), _chair_columns(other), CHAIR_STATISTICS,
                             n_resamples=n_resamples, seed=seed)
