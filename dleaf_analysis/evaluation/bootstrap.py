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
