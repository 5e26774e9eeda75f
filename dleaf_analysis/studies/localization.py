"""Localisation check: does a detector's ranking of layers (heads) agree with the causal ranking?

Causal score of a component = ``-effect`` (how much intervening on it suppresses the
hallucination; see :mod:`dleaf_analysis.studies.causal`).  Per event and causal map: Spearman
correlation between detector scores and causal scores, and the top-k hit rate
``|top_k(detector) & top_k(causal)| / k``.  A detector that cannot rank (constant scores, e.g.
``all-layers``) gets Spearman 0 and the chance hit rate ``k / n``.  Means over events with
bootstrap 95% CIs; ``random`` is the random-ranking baseline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr


def rank_agreement(det: np.ndarray, causal: np.ndarray, k: int) -> tuple[float, float]:
    """``(spearman, top-k hit rate)`` of two score vectors (higher = more suspect)."""
    det, causal = np.asarray(det, float), np.asarray(causal, float)
    n = len(det)
    if np.ptp(det) == 0 or np.ptp(causal) == 0:
        return 0.0, k / n
    rho = spearmanr(det, causal).statistic
    top_d = set(np.argsort(-det, kind="stable")[:k])
    top_c = set(np.argsort(-causal, kind="stable")[:k])
    return float(rho), len(top_d & top_c) / k


def mean_ci(x: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap 95% CI over items."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarize(agreement: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean Spearman and top-k hit rate per (level, causal map, detector), with CIs."""
    rows = []
    for (level, cmap, det), g in agreement.groupby(["level", "causal_map", "detector"], sort=False):
        for metric in ("spearman", "topk_hit"):
            m, lo, hi = mean_ci(g[metric].to_numpy(), n_resamples, seed)
            rows.append({"level": level, "causal_map": cmap, "detector": det, "metric": metric,
                         "mean": m, "ci_low": lo, "ci_high": hi, "n_events": len(g)})
    return pd.DataFrame(rows)


LIAE_DETECTORS = ("liae", "liae-z", "liae-mean-entropy")
BASELINE = "layer-profile"


def _compare(s: pd.DataFrame, a: str, b: str) -> str:
    x, y = s.loc[a], s.loc[b]
    if x["ci_low"] > y["ci_high"]:
        return "better than"
    if x["ci_high"] < y["ci_low"]:
        return "worse than"
    return "not distinguishable from"


def verdict(summary: pd.DataFrame, causal_map: str = "correct_layer", metric: str = "spearman") -> str:
    """A plain sentence: do LIAE and LIAE-z (the statistic D-LEAF thresholds) localise better than
    the best uniform detector, and better than the fixed ``layer-profile`` ordering?  A detector
    localises only if it beats the layer profile."""
    s = summary[(summary.level == "layer") & (summary.causal_map == causal_map) & (summary.metric == metric)]
    if s.empty:
        return f"no events for {causal_map}: nothing to compare"
    s = s.set_index("detector")
    others = s.drop(index=[d for d in LIAE_DETECTORS + (BASELINE, "causal-profile", "random") if d in s.index])
    best_other = others["mean"].idxmax()
    fmt = lambda d: f"`{d}` {s.loc[d, 'mean']:.3f} [{s.loc[d, 'ci_low']:.3f}, {s.loc[d, 'ci_high']:.3f}]"  # noqa: E731
    parts = []
    for det in ("liae", "liae-z"):
        if det not in s.index:
            continue
        txt = f"{fmt(det)} is {_compare(s, det, best_other)} the best uniform detector"
        if BASELINE in s.index:
            beats = _compare(s, det, BASELINE) == "better than"
            txt += f" and {_compare(s, det, BASELINE)} the layer profile ({'localises' if beats else 'does not localise'})"
        parts.append(txt)
    tail = f"best uniform: {fmt(best_other)}"
    if BASELINE in s.index:
        tail += f"; layer profile: {fmt(BASELINE)}"
    if "causal-profile" in s.index:
        tail += f"; best fixed ordering (causal profile): {fmt('causal-profile')}"
    if "random" in s.index:
        tail += f"; random: {s.loc['random', 'mean']:.3f}"
    n = int(s["n_events"].max())
    return f"On `{causal_map}` ({metric}, {n} events): " + "; ".join(parts) + f". ({tail}.)"
