"""POPE (Li et al. 2023): answer parsing and yes/no metrics."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from dleaf_analysis.evaluation.bootstrap import summary_table

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_official(text: str) -> str:
    """The parser of POPE's ``evaluate.py``: first sentence; "no" if it contains the word
    "No", "no" or "not", else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    ws = text.replace(",", "").split(" ")
    return "no" if ("No" in ws or "not" in ws or "no" in ws) else "yes"


NEGATION_WORDS = ("no", "not", "none", "nothing", "cannot", "can't", "isn't", "aren't", "don't", "doesn't", "without")


def parse_negation(text: str) -> str:
    """"no" if any negation word (case-insensitive) occurs anywhere, else "yes"."""
    ws = re.findall(r"[a-z']+", text.lower())
    return "no" if any(w in NEGATION_WORDS for w in ws) else "yes"


def parse_substring(text: str) -> str:
    """"yes" if the lower-cased text contains "yes", else "no" (VCD-style)."""
    return "yes" if "yes" in text.lower() else "no"


def parse_first_token(text: str) -> str:
    """The first word decides: "yes"/"no"; anything else counts as "no"."""
    m = re.match(r"\W*([a-z]+)", text.lower())
    return "yes" if m and m.group(1) == "yes" else "no"


ANSWER_PARSERS: dict[str, Callable[[str], str]] = {
    "official": parse_official,
    "negation": parse_negation,
    "substring": parse_substring,
    "first-token": parse_first_token,
}


def get_parser(name: str) -> Callable[[str], str]:
    if name not in ANSWER_PARSERS:
        raise ValueError(f"unknown answer parser {name!r}; choose one of {sorted(ANSWER_PARSERS)}")
    return ANSWER_PARSERS[name]


def pope_summary(
    labels: Sequence[str], predictions: Sequence[str], groups: Sequence | None = None,
    n_resamples: int = 1000, seed: int = 0,
) -> pd.DataFrame:
    """Accuracy, precision, recall, F1, yes-ratio (percent) with bootstrap 95% CIs.

    ``groups`` (e.g. image ids) makes the bootstrap resample whole groups (questions of one
    image together); default: each question alone.
    """
    cols = _confusion_columns(labels, predictions, groups)
    return summary_table(cols, POPE_STATISTICS, n=len(labels), n_resamples=n_resamples, seed=seed)


POPE_STATISTICS = {
    "accuracy": lambda s: 100 * (s["tp"] + s["tn"]) / (s["tp"] + s["fp"] + s["tn"] + s["fn"]),
    "precision": lambda s: 100 * s["tp"] / (s["tp"] + s["fp"]),
    "recall": lambda s: 100 * s["tp"] / (s["tp"] + s["fn"]),
    "f1": lambda s: 100 * 2 * s["tp"] / (2 * s["tp"] + s["fp"] + s["fn"]),
    "yes_ratio": lambda s: 100 * (s["tp"] + s["fp"]) / (s["tp"] + s["fp"] + s["tn"] + s["fn"]),
}


def _confusion_columns(labels, predictions, groups=None) -> dict[str, np.ndarray]:
    """Per group (or per question) confusion counts ``tp, fp, tn, fn``."""
    y = np.asarray([lab == "yes" for lab in labels], dtype=float)
    p = np.asarray([pred == "yes" for pred in predictions], dtype=float)
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    g = np.arange(len(y)) if groups is None else pd.factorize(np.asarray(groups))[0]
    per = pd.DataFrame({"g": g, "tp": y * p, "fp": (1 - y) * p, "tn": (1 - y) * (1 - p), "fn": y * (1 - p)})
    per = per.groupby("g").sum()
    return {k: per[k].to_numpy(float) for k in ("tp", "fp", "tn", "fn")}


def pope_paired(base: pd.DataFrame, other: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap of ``other - base`` per POPE variant and metric, resampling whole images
    (both tables: POPE details with ``variant, image, question, label, prediction``, same rows)."""
    from dleaf_analysis.evaluation.bootstrap import paired_difference

    frames = []
    for variant, a in base.groupby("variant", sort=False):
        b = other[other["variant"] == variant]
        if list(a["question"]) != list(b["question"]) or list(a["image"]) != list(b["image"]):
            raise ValueError(f"POPE {variant}: the two tables are not the same questions in the same order")
        ca = _confusion_columns(a["label"], a["prediction"], a["image"])
        cb = _confusion_columns(b["label"], b["prediction"], b["image"])
        d = paired_difference(ca, cb, POPE_STATISTICS, n_resamples=n_resamples, seed=seed)
        d.insert(0, "variant", variant)
        frames.append(d)
    return pd.concat(frames, ignore_index=True)
