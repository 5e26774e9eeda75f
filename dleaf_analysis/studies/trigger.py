"""The trigger study: when does D-LEAF fire, and does firing mark hallucinations?

For each image: the greedy caption; D-LEAF replayed over it with its own editor and no correction
(``gamma = 0``: :meth:`~dleaf_analysis.interventions.DLeaf.replay`, so the firing rule is the one
that decodes), and a teacher-forced trace of the caption, scored by every registered layer
detector.  Each detector gets D-LEAF's trigger rule applied to its own score (fire in a candidate
layer when the score exceeds its running mean by ``k`` running standard deviations, after the
warm-up).  Per generated token: its type (:data:`TOKEN_TYPES`) and whether each trigger fired in
some candidate layer.

Tables: ``firing_by_type`` (firing rate per token type); ``precision_recall`` (at object steps:
precision and recall of firing for *hallucinated* object steps, next to a random trigger with the
same per-caption firing rate, with paired bootstrap CIs over captions of the difference);
``auroc`` (per layer and detector, the hallucinated-vs-grounded AUROC of the score at object steps,
and D-LEAF's own statistic: the largest margin over its threshold among candidate layers).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dleaf_analysis import detectors
from dleaf_analysis.models.generation import caption_ids
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.sources import ImageSource
from dleaf_analysis.studies.base import Study, register
from dleaf_analysis.studies.events import mention_spans

TOKEN_TYPES = ("hallucinated object", "grounded object", "article", "punctuation", "template word", "end")
ARTICLES = {"a", "an", "the"}


def token_types(lm: LoadedModel, source: ImageSource, i: int, ids: list[int]) -> list[tuple[str, str | None]]:
    """``(type, object)`` of each generated token of ``ids`` and of the end step after them."""
    tok = lm.tokenizer
    _, found = mention_spans(source, tok, ids)
    gt = source.objects(i)
    out: list[tuple[str, str | None]] = []
    obj_at = {}
    for m, a, b in found:
        for k in range(a, b):
            obj_at[k] = m.object
    for k, t in enumerate(ids):
        if k in obj_at:
            out.append(("grounded object" if obj_at[k] in gt else "hallucinated object", obj_at[k]))
            continue
        w = tok.decode([t], skip_special_tokens=True).strip().lower()
        if w in ARTICLES:
            out.append(("article", None))
        elif w and all(not c.isalnum() for c in w):
            out.append(("punctuation", None))
        else:
            out.append(("template word", None))
    out.append(("end", None))
    return out


def running_trigger(scores: torch.Tensor, k: float, warmup: int = 0) -> torch.Tensor:
    """D-LEAF's running rule on any score ``[S, L]``: fire where the score exceeds the running mean
    of the steps before it by ``k`` running standard deviations (no firing at step 0, nor before
    ``warmup``); ``bool [S, L]``."""
    S = scores.shape[0]
    cum = torch.cumsum(scores.float(), 0)
    cum2 = torch.cumsum(scores.float() ** 2, 0)
    n = torch.arange(1, S + 1, dtype=torch.float32)[:, None]
    var = (cum2 / n - (cum / n) ** 2).clamp_min(0)
    sd_before = torch.cat([torch.zeros_like(var[:1]), var[:-1].sqrt()])
    mean_before = torch.cat([torch.zeros_like(cum[:1]), cum[:-1] / n[:-1]])
    fire = scores.float() > mean_before + k * sd_before
    fire[0] = False
    if warmup:
        fire[:warmup] = False
    return fire


@register
class Trigger(Study):
    name = "trigger"
    description = ("D-LEAF's trigger and every layer detector (with D-LEAF's rule on its own score): firing rate by "
                   "token type, precision and recall for hallucinated object steps against a random trigger with the "
                   "same per-caption rate, and the hallucinated-vs-grounded AUROC per layer.")
    uses_events = False
    figures = ("trigger_firing",)
    default_options = {"max_new_tokens": None}

    def units(self, ctx):
        return [(ctx.source.key(i), i) for i in range(len(ctx.source))]

    def unit(self, ctx, i: int) -> list[dict]:
        lm, src, cfg = ctx.lm, ctx.source, ctx.dleaf
        ids = caption_ids(lm, [src.image(i)], src.prompt, max_new_tokens=ctx.options["max_new_tokens"] or
                          src.max_new_tokens, progress=False)[0]
        inputs = lm.inputs([src.image(i)], [src.prompt])
        trig = type(cfg).from_dict({**cfg.to_dict(), "gamma": 0.0}).replay(lm, inputs, ids, decisions=True)
        dec = pd.DataFrame(trig.decisions)
        from dleaf_analysis.tracing import trace_forward

        cache = trace_forward(lm, None, inputs=inputs, continuation_ids=ids, backend="hooks", prompt=src.prompt)
        L = cache.n_layers
        cand = cfg.candidate_layers(L)
        types = token_types(lm, src, i, ids)
        S = len(types)
        fired = np.zeros((S, L), bool)
        margin = np.full((S, L), np.nan)
        if len(dec):
            d = dec[dec["step"] < S]
            fired[d["step"].to_numpy(), d["layer"].to_numpy()] = d["fired"].to_numpy()
            margin[d["step"].to_numpy(), d["layer"].to_numpy()] = (d["liae"] - d["threshold"]).to_numpy()
        rows = []
        det_scores = {}
        for det in detectors.select("layer"):
            sc = det.suspect(cache, seed=ctx.seed)[:S].float()
            det_scores[det.name] = (sc.numpy(), running_trigger(sc, cfg.effective_k, cfg.warmup).numpy())
        for s, (typ, obj) in enumerate(types):
            row = {"item": src.key(i), "image": i, "step": s, "type": typ, "object": obj,
                   "token": lm.token_strs([ids[s]])[0] if s < len(ids) else "</end>",
                   "dleaf_fired": bool(fired[s, cand].any()), "dleaf_layers": [int(l) for l in cand if fired[s, l]],
                   "dleaf_margin": float(np.nanmax(margin[s, cand])) if np.isfinite(margin[s, cand]).any() else None}
            for name, (sc, fi) in det_scores.items():
                row[f"score:{name}"] = [float(v) for v in sc[s]]
                row[f"fired:{name}"] = bool(fi[s, cand].any())
            rows.append(row)
        return rows

    def finalize(self, ctx, events, rows, summary):
        steps = rows.drop(columns=["key"], errors="ignore")
        triggers = ["dleaf"] + [c.split(":", 1)[1] for c in steps.columns if c.startswith("fired:")]
        fired_col = {t: "dleaf_fired" if t == "dleaf" else f"fired:{t}" for t in triggers}
        by_type = []
        for t in triggers:
            r = {"trigger": t, "all steps": 100 * float(steps[fired_col[t]].mean())}
            for typ in TOKEN_TYPES:
                sel = steps[steps["type"] == typ]
                r[typ] = 100 * float(sel[fired_col[t]].mean()) if len(sel) else float("nan")
            by_type.append(r)
        by_type = pd.DataFrame(by_type)
        obj = steps[steps["type"].isin(("hallucinated object", "grounded object"))].copy()
        obj["hall"] = obj["type"] == "hallucinated object"
        pr = [precision_recall(obj, fired_col[t], steps, t, seed=ctx.seed if ctx else 0) for t in triggers]
        auroc = auroc_table(obj, [t for t in triggers if t != "dleaf"], ctx.seed if ctx else 0)
        summary.update({"n_steps": len(steps), "n_object_steps": len(obj), "n_hallucinated_steps": int(obj["hall"].sum()),
                        "dleaf_firing_rate": float(steps["dleaf_fired"].mean()) if len(steps) else float("nan"),
                        "dleaf_firing_rate_first_3_steps": float(steps.loc[steps["step"] < 3, "dleaf_fired"].mean())
                        if len(steps) else float("nan")})
        return {"steps": steps, "firing_by_type": by_type, "precision_recall_summary": pd.DataFrame(pr),
                "auroc_summary": auroc}

    def report(self, tables, summary) -> str:
        from dleaf_analysis.tables import md_table

        pr = tables["precision_recall_summary"]
        return "\n".join(["### trigger", "", self.description, "",
                          md_table(tables["firing_by_type"].round(1)), "", md_table(pr.round(3)), ""])


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def precision_recall(obj: pd.DataFrame, col: str, steps: pd.DataFrame, trigger: str, n_resamples: int = 1000,
                     seed: int = 0) -> dict:
    """Precision and recall of firing for hallucinated object steps, a random trigger with the same
    per-caption firing rate (its expected precision and recall), and bootstrap CIs over captions."""
    rate = steps.groupby("image")[col].mean()  # each caption's firing rate over all its steps
    o = obj.assign(rate=obj["image"].map(rate), fired=obj[col].astype(float))
    per = o.groupby("image").apply(lambda g: pd.Series({
        "tp": float((g.fired * g.hall).sum()), "fp": float((g.fired * ~g.hall).sum()), "h": float(g.hall.sum()),
        "rtp": float((g.rate * g.hall).sum()), "rfp": float((g.rate * ~g.hall).sum())}), include_groups=False)
    def stats(p):
        tp, fp, h, rtp, rfp = (p[c].sum() for c in ("tp", "fp", "h", "rtp", "rfp"))
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"precision": tp / (tp + fp), "random_precision": rtp / (rtp + rfp),
                    "recall": tp / h, "random_recall": rtp / h, "base_rate": h / len(o) if len(o) else np.nan}
    point = stats(per)
    rng = np.random.default_rng(seed)
    boot = [stats(per.iloc[rng.integers(0, len(per), len(per))]) for _ in range(n_resamples)] if len(per) else []
    out = {"trigger": trigger, **point, "n_object_steps": len(o), "n_hallucinated": int(o["hall"].sum())}
    for m in ("precision", "recall"):
        d = np.array([b[m] - b[f"random_{m}"] for b in boot], float)
        d = d[np.isfinite(d)]
        out[f"{m}_minus_random"] = point[m] - point[f"random_{m}"]
        out[f"{m}_minus_random_low"] = float(np.quantile(d, 0.025)) if len(d) else float("nan")
        out[f"{m}_minus_random_high"] = float(np.quantile(d, 0.975)) if len(d) else float("nan")
    return out


def auroc_table(obj: pd.DataFrame, dets: list[str], seed: int = 0, n_resamples: int = 300) -> pd.DataFrame:
    """Per detector and layer (and D-LEAF's statistic): AUROC of hallucinated vs grounded object steps,
    with a bootstrap CI over captions."""
    rng = np.random.default_rng(seed)
    images = obj["image"].unique()
    groups = {i: g for i, g in obj.groupby("image")}
    boots = [pd.concat([groups[i] for i in rng.choice(images, len(images))]) for _ in range(n_resamples)] \
        if len(images) else []
    rows = []

    def add(name: str, layer, values):
        v = values(obj)
        h = obj["hall"].to_numpy()
        a = _auc(v[h], v[~h])
        bs = [_auc(values(b)[b["hall"].to_numpy()], values(b)[~b["hall"].to_numpy()]) for b in boots]
        bs = np.array([x for x in bs if np.isfinite(x)])
        rows.append({"detector": name, "layer": layer, "auroc": a,
                     "ci_low": float(np.quantile(bs, 0.025)) if len(bs) else float("nan"),
                     "ci_high": float(np.quantile(bs, 0.975)) if len(bs) else float("nan"),
                     "n_hallucinated": int(h.sum()), "n_grounded": int((~h).sum())})

    add("dleaf (margin over threshold)", pd.NA, lambda d: d["dleaf_margin"].astype(float).to_numpy())
    if len(obj):
        L = len(obj[f"score:{dets[0]}"].iloc[0]) if dets else 0
        for det in dets:
            for l in range(L):
                add(det, l, lambda d, det=det, l=l: np.array([s[l] for s in d[f"score:{det}"]], float))
    out = pd.DataFrame(rows)
    return out.assign(layer=out["layer"].astype("Int64"))  # <NA>: D-LEAF's statistic over its candidate layers
