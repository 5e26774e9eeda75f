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


def verdict(summary: pd.DataFrame, causal_map: str = "correct_layer", metric: str = "spearman") -> str:
    """A plain sentence: does LIAE localise better than the uniform detectors on this map?"""
    s = summary[(summary.level == "layer") & (summary.causal_map == causal_map) & (summary.metric == metric)]
    if s.empty:
        return f"no events for {causal_map}: nothing to compare"
    s = s.set_index("detector")
    liae = s.loc["liae"]
    others = s.drop(index=[d for d in ("liae", "liae-mean-entropy") if d in s.index])
    best_other = others["mean"].idxmax()
    bo = others.loc[best_other]
    sep = liae["ci_low"] > bo["ci_high"]
    worse = liae["ci_high"] < bo["ci_low"]
    rel = "better than" if sep else ("worse than" if worse else "not distinguishable from")
    return (f"On `{causal_map}` ({metric}, {int(liae['n_events'])} events): LIAE {liae['mean']:.3f} "
            f"[{liae['ci_low']:.3f}, {liae['ci_high']:.3f}] is {rel} the best uniform detector, "
            f"`{best_other}` {bo['mean']:.3f} [{bo['ci_low']:.3f}, {bo['ci_high']:.3f}]; "
            f"random: {s.loc['random', 'mean']:.3f}.")
