"""Is a caption still a caption, and does a method beat simply saying less?

- :func:`degenerate` classifies an output: a bare ``yes`` / ``no`` (question-answering mode), *no
  object* mentioned, or *not a description* (fewer than ``min_words`` words, or one word repeated
  for most of it).  CHAIR scores such outputs as hallucination-free, so a method that makes the
  model stop describing looks like a hallucination fix.
- :func:`truncated_greedy` is the **length-matched truncation baseline**: greedy's object list
  (distinct objects in order of first mention) cut, per image, to the number of distinct objects
  the method's caption names.  Saying less lowers CHAIR by itself; a method "reduces
  hallucination" only where it beats this baseline.
- :func:`compare` puts a method beside greedy on the same images: the headline paired differences,
  the degenerate-output rates, the paired differences on the images where both captions are real
  descriptions, and the method against the truncation baseline there, with a plain verdict.

Object-list metrics (``objects_*``) count each object once per caption: CHAIR_s (any
hallucinated object), CHAIR_i over distinct objects, recall.  Paired bootstrap over images.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from dleaf_analysis.evaluation.bootstrap import paired_difference
from dleaf_analysis.evaluation.chair import CHAIR_STATISTICS, chair_paired

DEGENERATE_KINDS = ("yes/no", "no object", "not a description")
_YESNO = re.compile(r"^\s*(a\s+)?(yes|no)\b[\s.,!]*$", re.IGNORECASE)


def degenerate(caption: str, n_mentions: int, min_words: int = 5) -> str | None:
    """The kind of degenerate output (one of :data:`DEGENERATE_KINDS`), or ``None`` for a description."""
    text = (caption or "").strip()
    if _YESNO.match(text):
        return "yes/no"
    words = re.findall(r"\w+", text.lower())
    if len(words) < min_words:
        return "not a description"
    top = max(pd.Series(words).value_counts().iloc[0] / len(words), 0)
    if len(words) >= 10 and top > 0.6:
        return "not a description"
    if n_mentions == 0:
        return "no object"
    return None


def with_validity(details: pd.DataFrame, min_words: int = 5) -> pd.DataFrame:
    """``details`` (a CHAIR details table) with ``degenerate`` (kind or None) and ``objects`` (distinct
    objects in order of first mention) columns."""
    d = details.copy()
    d["degenerate"] = [degenerate(c, n, min_words) for c, n in zip(d["caption"], d["n_mentions"])]
    d["objects"] = [list(dict.fromkeys(m)) for m in d["mentioned"]]
    return d


def object_list_columns(objects: list[list[str]], gt: list, lengths: np.ndarray | None = None) -> dict:
    """Paired-bootstrap columns of object-list CHAIR for captions given as object lists."""
    hall = np.array([sum(o not in set(g) for o in obj) for obj, g in zip(objects, gt)], float)
    n_obj = np.array([len(o) for o in objects], float)
    cov = np.array([len(set(o) & set(g)) for o, g in zip(objects, gt)], float)
    n_gt = np.array([len(g) for g in gt], float)
    return {"any": (hall > 0).astype(float), "one": np.ones(len(objects)), "hall": hall, "ment": n_obj, "cov": cov,
            "gt": n_gt, "len": n_obj if lengths is None else np.asarray(lengths, float)}


OBJECT_STATISTICS = {"objects_CHAIR_s": CHAIR_STATISTICS["CHAIR_s"], "objects_CHAIR_i": CHAIR_STATISTICS["CHAIR_i"],
                     "objects_recall": CHAIR_STATISTICS["recall"], "n_objects": lambda s: s["ment"] / s["one"]}


def truncated_greedy(greedy: pd.DataFrame, method: pd.DataFrame) -> list[list[str]]:
    """Greedy's object list cut, per image, to the number of distinct objects the method names."""
    return [g[: len(m)] for g, m in zip(greedy["objects"], method["objects"])]


def compare(greedy: pd.DataFrame, method: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> dict:
    """A method beside greedy on the same images (both CHAIR details tables, same order).

    Returns a dict of tables: ``headline`` (paired differences on every image), ``validity``
    (degenerate-output rates of both, by kind), ``valid`` (paired differences on the images where
    both outputs are descriptions), ``truncation`` (the method against greedy's object list cut to
    the method's object count, object-list metrics, on those images), and ``verdict`` (a sentence)."""
    g, m = with_validity(greedy), with_validity(method)
    if len(g) != len(m):
        raise ValueError(f"{len(g)} greedy captions but {len(m)} method captions: compare the same images")
    headline = chair_paired(g, m, n_resamples=n_resamples, seed=seed)
    kinds = []
    for name, d in (("greedy", g), ("method", m)):
        row = {"caption": name, "degenerate": 100 * float(d["degenerate"].notna().mean())}
        row.update({k: 100 * float((d["degenerate"] == k).mean()) for k in DEGENERATE_KINDS})
        kinds.append(row)
    validity = pd.DataFrame(kinds)
    ok = (g["degenerate"].isna() & m["degenerate"].isna()).to_numpy()
    gv, mv = g[ok].reset_index(drop=True), m[ok].reset_index(drop=True)
    out = {"headline": headline, "validity": validity, "n_images": len(g), "n_valid": int(ok.sum())}
    if ok.sum() >= 2:
        out["valid"] = chair_paired(gv, mv, n_resamples=n_resamples, seed=seed)
        gt = list(mv["gt_objects"])
        trunc = object_list_columns(truncated_greedy(gv, mv), gt)
        meth = object_list_columns(list(mv["objects"]), gt)
        out["truncation"] = paired_difference(trunc, meth, OBJECT_STATISTICS, n_resamples=n_resamples, seed=seed)
    else:
        out["valid"] = out["truncation"] = pd.DataFrame()
    out["verdict"] = verdict(out)
    return out


def _row(t: pd.DataFrame, metric: str) -> pd.Series | None:
    if t is None or not len(t) or metric not in set(t["metric"]):
        return None
    return t.set_index("metric").loc[metric]


def verdict(c: dict) -> str:
    """Does the method reduce hallucination?  Only if it lowers CHAIR_i on real descriptions *and*
    beats greedy cut to the same number of objects; the sentence says which tests it passes."""
    v, t = _row(c.get("valid"), "CHAIR_i"), _row(c.get("truncation"), "objects_CHAIR_i")
    deg = c["validity"].set_index("caption")["degenerate"]
    head = f"degenerate outputs {deg['method']:.1f}% (greedy {deg['greedy']:.1f}%); "
    if v is None or t is None:
        return head + "too few valid captions to compare"
    fmt = lambda r: f"{r['diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"  # noqa: E731
    lower = v["ci_high"] < 0
    beats = t["ci_high"] < 0
    body = (f"on {c['n_valid']} images with two real descriptions, CHAIR_i {fmt(v)} points against greedy and "
            f"object-list CHAIR_i {fmt(t)} against greedy cut to the same number of objects")
    if lower and beats:
        return head + body + ": it reduces hallucination"
    if lower:
        return head + body + ": it lowers CHAIR_i but no more than saying less does"
    if v["ci_low"] > 0:
        return head + body + ": it raises hallucination"
    return head + body + ": no reduction distinguishable from zero"
