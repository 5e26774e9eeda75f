"""Tidy rows of causal maps (shared by the studies that compute them) and the attribution-vs-exact
agreement."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

MAP_COLUMNS = ["event", "map", "layer", "head", "effect"]


def tidy_maps(key: str, maps: dict) -> list[dict]:
    """``{name: [L] or [L, H]}`` -> one row per (map, layer, head) (``head = -1`` for layer maps)."""
    rows = []
    for name, arr in maps.items():
        if not isinstance(arr, np.ndarray):
            continue
        if arr.ndim == 1:
            rows += [{"event": key, "map": name, "layer": l, "head": -1, "effect": float(v)} for l, v in enumerate(arr)]
        else:
            rows += [{"event": key, "map": name, "layer": l, "head": h, "effect": float(arr[l, h])}
                     for l in range(arr.shape[0]) for h in range(arr.shape[1])]
    return rows


def maps_table(rows: pd.DataFrame) -> pd.DataFrame:
    maps = rows[rows["map"].notna()] if "map" in rows else rows.iloc[:0]
    return maps.reindex(columns=MAP_COLUMNS)


def attribution_agreement(maps: pd.DataFrame) -> float:
    """Spearman between attribution patching and exact head patching, over all (event, head)."""
    a = maps[maps["map"] == "attribution_head"].set_index(["event", "layer", "head"])["effect"]
    e = maps[maps["map"] == "patch_head"].set_index(["event", "layer", "head"])["effect"]
    j = pd.concat([a, e], axis=1, keys=["attr", "exact"]).dropna()
    return float(spearmanr(j["attr"], j["exact"]).statistic) if len(j) > 2 else float("nan")
