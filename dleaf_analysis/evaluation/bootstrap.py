"""Percentile bootstrap confidence intervals over resampled items (captions, images)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd


def bootstrap_ci(
    columns: dict[str, np.ndarray],
    statistics: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ratio statistics under resampling of items.

    ``columns``: per-item arrays ``[N]`` (e.g. counts per caption).  Each statistic maps a dict of
    resampled column *sums* ``[R]`` to values ``[R]`` (ratios of sums, so the point estimate is the
    statistic of the full sums).  Returns ``{name: (low, high)}``.
    """
    n = len(next(iter(columns.values())))
    if n == 0:
        return {k: (float("nan"), float("nan")) for k in statistics}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    sums = {k: np.asarray(v, dtype=np.float64)[idx].sum(axis=1) for k, v in columns.items()}
    alpha = (1 - level) / 2
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, fn in statistics.items():
            vals = np.asarray(fn(sums), dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            out[name] = (
                (float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))) if len(vals) else (float("nan"),) * 2
            )
    return out


def summary_table(
    columns: dict[str, np.ndarray],
    statistics: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]],
    n: int,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per statistic: the point value (statistic of the full column sums), its bootstrap
    95% CI, and ``n`` (items summarised)."""
    full = {k: np.array([np.asarray(v, dtype=np.float64).sum()]) for k, v in columns.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        point = {k: float(fn(full)[0]) for k, fn in statistics.items()}
    ci = bootstrap_ci(columns, statistics, n_resamples=n_resamples, seed=seed)
    return pd.DataFrame(
        [{"metric": k, "value": point[k], "ci_low": ci[k][0], "ci_high": ci[k][1], "n": n} for k in statistics]
    )


def paired_difference(
    columns_a: dict[str, np.ndarray],
    columns_b: dict[str, np.ndarray],
    statistics: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Paired bootstrap of ``stat(b) - stat(a)`` on the same items (e.g. a method vs greedy on
    the same images): every resample draws one set of items (or of ``groups``, e.g. images of
    POPE questions) and evaluates both methods on it.

    Returns one row per statistic: ``diff`` (on all items), its percentile CI, ``p_two_sided``
    (twice the smaller share of resampled differences on either side of 0) and ``n``.
    """
    n = len(next(iter(columns_a.values())))
    for k, v in columns_b.items():
        if len(v) != n:
            raise ValueError(f"paired columns differ in length ({len(v)} vs {n}): not the same items")
    keys = np.arange(n) if groups is None else np.asarray(groups)
    uniq, inv = np.unique(keys, return_inverse=True)
    G = len(uniq)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, G, size=(n_resamples, G))
    weights = np.zeros((n_resamples, G))
    np.add.at(weights, (np.arange(n_resamples)[:, None], draws), 1.0)  # [R, G] multiplicities
    w_items = weights[:, inv]  # [R, n]

    def sums(cols, w):
        return {k: w @ np.asarray(v, dtype=np.float64) for k, v in cols.items()}

    full_a, full_b = sums(columns_a, np.ones((1, n))), sums(columns_b, np.ones((1, n)))
    ra, rb = sums(columns_a, w_items), sums(columns_b, w_items)
    alpha = (1 - level) / 2
    rows = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, fn in statistics.items():
            point = float(fn(full_b)[0] - fn(full_a)[0])
            d = np.asarray(fn(rb) - fn(ra), dtype=np.float64)
            d = d[np.isfinite(d)]
            lo, hi = (float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))) if len(d) else (float("nan"),) * 2
            p = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))) if len(d) else float("nan")
            rows.append({"metric": name, "diff": point, "ci_low": lo, "ci_high": hi, "p_two_sided": p, "n": G})
    return pd.DataFrame(rows)
