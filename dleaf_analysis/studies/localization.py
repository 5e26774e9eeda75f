"""The localisation study: does a detector's ranking of layers (heads) agree with the causal ranking?

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

from dleaf_analysis import detectors
from dleaf_analysis.seeding import derive_seed
from dleaf_analysis.studies import causal
from dleaf_analysis.studies.base import Study, register
from dleaf_analysis.studies.events import event_inputs
from dleaf_analysis.studies.maps import attribution_agreement, maps_table, tidy_maps


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
    uniform = [d for d in detectors.names("layer", "uniform") if d in s.index]  # selected by family
    others = s.loc[uniform]
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


def detector_rows(lm, image, prefix_ids: list[int], key: str, seed: int, prompt: str) -> list[dict]:
    """Detector scores at the event's step: layers ``[L]`` and heads ``[L, H]``.  The trace covers
    every step of the generated prefix, so the running detectors (``liae-z``) see the same
    history as D-LEAF in decoding; the last step is the event's."""
    from dleaf_analysis.tracing import trace_forward

    c = trace_forward(lm, image, prompt=prompt, continuation_ids=prefix_ids, backend="hooks")
    rows = []
    event_seed = derive_seed(seed, key)
    for det in detectors.select("layer"):
        sc = det.suspect(c, seed=event_seed)[-1]
        rows += [{"event": key, "detector": det.name, "level": "layer", "layer": l, "head": -1, "score": float(v)}
                 for l, v in enumerate(sc)]
    for det in detectors.select("head"):  # heads that warrant correction: higher = more suspect (IAF: low focus)
        sc = det.suspect(c, seed=event_seed)[-1]
        rows += [{"event": key, "detector": det.name, "level": "head", "layer": l, "head": h, "score": float(sc[l, h])}
                 for l in range(sc.shape[0]) for h in range(sc.shape[1])]
    return rows


def agreement(maps: pd.DataFrame, dets: pd.DataFrame) -> pd.DataFrame:
    """Per event, causal map and detector: Spearman and top-k hit (layers: k = 2; heads within
    each layer: k = 1, averaged over layers).

    Layer maps also get two constant baselines, the same ordering of layers for every event:
    ``layer-profile`` (each layer's mean raw LIAE over the study's events: which layers are
    *usually* diffuse; a detector localises only if it beats it) and ``causal-profile`` (each
    layer's mean causal score over the *other* events: the best any fixed ordering can do).
    """
    rows = []
    layer_maps = maps[maps["head"] == -1]
    totals = layer_maps.groupby(["map", "layer"])["effect"].agg(["sum", "count"])
    liae = dets[(dets.level == "layer") & (dets.detector == "liae")]
    profile = liae.groupby("layer")["score"].mean().sort_index().to_numpy() if len(liae) else None
    for ev, m in maps.groupby("event"):
        d_ev = dets[dets.event == ev]
        for cmap, g in m.groupby("map"):
            if cmap.startswith("m_"):
                continue
            causal_score = -g.sort_values(["layer", "head"])["effect"].to_numpy()
            if (g["head"] == -1).all():
                for det, dg in d_ev[d_ev.level == "layer"].groupby("detector"):
                    rho, hit = rank_agreement(dg.sort_values("layer")["score"].to_numpy(), causal_score, 2)
                    rows.append({"event": ev, "level": "layer", "causal_map": cmap, "detector": det,
                                 "spearman": rho, "topk_hit": hit})
                t = totals.loc[cmap].sort_index()
                others = (t["count"].to_numpy() - 1).clip(min=1)
                loo = -(t["sum"].to_numpy() - g.sort_values("layer")["effect"].to_numpy()) / others
                baselines = {"causal-profile": loo}
                if profile is not None and len(profile) == len(causal_score):
                    baselines["layer-profile"] = profile
                for det, sc in baselines.items():
                    rho, hit = rank_agreement(sc, causal_score, 2)
                    rows.append({"event": ev, "level": "layer", "causal_map": cmap, "detector": det,
                                 "spearman": rho, "topk_hit": hit})
            else:
                L = int(g["layer"].max()) + 1
                cs = causal_score.reshape(L, -1)
                for det, dg in d_ev[d_ev.level == "head"].groupby("detector"):
                    ds = dg.sort_values(["layer", "head"])["score"].to_numpy().reshape(L, -1)
                    per = [rank_agreement(ds[l], cs[l], 1) for l in range(L)]
                    rows.append({"event": ev, "level": "head", "causal_map": cmap, "detector": det,
                                 "spearman": float(np.mean([p[0] for p in per])),
                                 "topk_hit": float(np.mean([p[1] for p in per]))})
    return pd.DataFrame(rows)


RECALL_KS = ("1", "3", "10%")


@register
class Localization(Study):
    name = "localization"
    description = ("Every registered detector's ranking of layers and heads at the event's step against the causal "
                   "maps (ablation, correction, patching), with the layer-profile and causal-profile baselines.  Head "
                   "maps are ranked by per-layer midpoint integrated gradients and verified by exact patching on their "
                   "top cells and a random sample (every ``verify_every``-th event exactly on every cell, so that the "
                   "ranking's recall of exact patching's top heads is measured).")
    figures = ("localization_detectors", "causal_heatmaps")
    default_options = {"head_ranking": "attribution", "verify_every": 4, "top_fraction": 0.1, "random_fraction": 0.05}

    def unit(self, ctx, ev: dict) -> list[dict]:
        from dleaf_analysis import lens

        o = ctx.options
        inputs = event_inputs(ctx.lm, ctx.source, ev)
        cf = event_inputs(ctx.lm, ctx.source, ev, counterfactual=True) if ev.get("cue") else None
        verify = o["head_ranking"] == "attribution" and derive_seed(ctx.seed, ev["key"]) % o["verify_every"] == 0
        ranking_options = {"top_fraction": o["top_fraction"], "random_fraction": o["random_fraction"],
                           "seed": derive_seed(ctx.seed, ev["key"], "cells"), "exact": verify}
        with lens.cost_meter() as cost:
            maps = causal.causal_maps(ctx.lm, inputs, int(ev["token_id"]), int(ev["preferred_id"]), cf,
                                      kinds=("ablation", "patching"), batch_size=ctx.batch_size,
                                      head_ranking=o["head_ranking"], ranking_options=ranking_options)
        rows = tidy_maps(ev["key"], {k: v for k, v in maps.items() if ":" not in k})
        for name in causal.HEAD_PATCH_MAPS:
            ig, mask = maps.get(f"ig:{name}"), maps.get(f"exact:{name}")
            if ig is None:
                continue
            rows.append({"event": ev["key"], "table": "verification", "map": None, "head_map": name,
                         "n_exact": int(mask.sum()), "n_cells": int(mask.size), "verified_all": bool(mask.all())})
            if mask.all():  # a verification event: recall of the ranking against exact patching
                exact = maps[name]
                k10 = max(1, int(np.ceil(0.1 * exact.size)))
                for k, kk in (("1", 1), ("3", 3), ("10%", k10)):
                    rows.append({"event": ev["key"], "table": "recall", "map": None, "head_map": name, "k": k,
                                 "recall": causal.recall_at(ig, exact, kk)})
                rows.append({"event": ev["key"], "table": "recall", "map": None, "head_map": name, "k": "spearman",
                             "recall": float(spearmanr(ig.ravel(), exact.ravel()).statistic)})
        rows.append({"event": ev["key"], "table": "cost", "map": None, "forward_equivalents": cost["forward_equivalents"],
                     "sequences": cost["sequences"]})
        rows += detector_rows(ctx.lm, ctx.source.image(int(ev["image"])), [int(t) for t in ev["prefix_ids"]],
                              ev["key"], ctx.seed, ctx.source.prompt)
        return rows

    def finalize(self, ctx, events, rows, summary):
        maps = maps_table(rows)
        summary["attribution_vs_exact_spearman"] = attribution_agreement(maps)
        dets = rows[rows["detector"].notna()] if "detector" in rows else pd.DataFrame(
            columns=["event", "detector", "level", "layer", "head", "score"])
        dets = dets[["event", "detector", "level", "layer", "head", "score"]]
        agree = agreement(maps, dets)
        s = summarize(agree)
        summary["verdict"] = [verdict(s, m) for m in ("correct_layer", "layer_zero", "patch_layer")]
        tables = {"events": events, "maps": maps, "detectors": dets, "agreement": agree, "localization_summary": s}
        table = rows["table"] if "table" in rows else pd.Series(dtype=object)
        cost = rows[table == "cost"]
        if len(cost):
            summary["forward_equivalents_per_event"] = float(cost["forward_equivalents"].mean())
        rec = rows[table == "recall"]
        if len(rec):
            out = []
            for (m, k), g in rec.groupby(["head_map", "k"], sort=False):
                mean, lo, hi = mean_ci(g["recall"].to_numpy())
                out.append({"head_map": m, "k": k, "mean": mean, "ci_low": lo, "ci_high": hi, "n_events": len(g)})
            tables["attribution_recall_summary"] = pd.DataFrame(out)
        ver = rows[table == "verification"]
        if len(ver):
            summary["exact_cells_share"] = float(ver["n_exact"].sum() / ver["n_cells"].sum())
        return tables

    def report(self, tables, summary) -> str:
        from dleaf_analysis.tables import md_table

        lines = ["### localization", "", self.description, ""]
        lines += [f"- {v}" for v in summary.get("verdict", [])]
        r = tables.get("attribution_recall_summary")
        if r is not None and len(r):
            lines += ["", "Recall of exact patching's top heads by the attribution ranking (verification events):", "",
                      md_table(r.round(3)), ""]
        if "forward_equivalents_per_event" in summary:
            lines.append(f"Compute: {summary['forward_equivalents_per_event']:.1f} forward-equivalents per event; "
                         f"{100 * summary.get('exact_cells_share', 1):.0f}% of head cells patched exactly.")
        return "\n".join(lines + [""])
