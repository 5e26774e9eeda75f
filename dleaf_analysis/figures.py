"""Figure registry: each figure is ``data(ctx) -> tidy DataFrame`` plus ``plot(df) -> Figure``.

``render_all`` writes, per figure, ``<name>.png``, ``<name>.pdf`` and ``<name>.csv`` (the data
behind it) and a ``manifest.json`` entry (data hash, protocol, command).  Figures that summarise
evaluations and studies read the tables ``dleaf reproduce`` wrote (``ctx.results``); the worked
examples (figures 1, 2, 5 and the attention grid) take their tables from
:mod:`dleaf_analysis.studies.examples`.  Figures compute nothing: they plot tidy tables.  Everything is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from dleaf_analysis.paths import FIGURES_DIR


class FigureSkipped(Exception):
    """A figure that does not apply to these results (the message says why); it is logged, not drawn."""


@dataclass
class FigureContext:
    """What figures may use: the model, the results directory of ``dleaf reproduce``, sizes, and
    the image source of the worked examples (default: the scene world's test splits)."""

    results: Path = Path("results")
    lm: object | None = None
    n_images: int = 100
    seed: int = 0
    source: object | None = None  # an ImageSource; None = the scene world
    tuned_file: Path | None = None

    @property
    def is_scene(self) -> bool:
        return self.source is None or getattr(self.source, "kind", None) == "scene"

    def model(self):
        if self.lm is None:
            from dleaf_analysis.models import load_model

            self.lm = load_model()
        return self.lm

    def table(self, relpath: str) -> pd.DataFrame:
        p = self.results / relpath
        if not p.is_file():
            raise FigureSkipped(f"{p} not found: run `dleaf reproduce` (or `--quick`) or the study that writes it "
                                "first, or pass --results")
        return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)


@dataclass
class FigureSpec:
    name: str
    title: str
    data: Callable[[FigureContext], pd.DataFrame]
    plot: Callable[[pd.DataFrame], plt.Figure]
    paper: str | None = None  # the paper figure it regenerates, if any


FIGURES: dict[str, FigureSpec] = {}


def register(name: str, title: str, paper: str | None = None):
    def deco(cls):
        FIGURES[name] = FigureSpec(name, title, cls.data, cls.plot, paper)
        return cls
    return deco


# -- data helpers ------------------------------------------------------------------------------
def _metric_bars(df: pd.DataFrame, by: str, title: str) -> plt.Figure:
    """CHAIR_s, CHAIR_i and recall side by side: one bar per ``by`` value, with its 95% CI."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, m in zip(axes, ["CHAIR_s", "CHAIR_i", "recall"]):
        d = df[df.metric == m]
        ax.bar(d[by], d["value"], color=sns.color_palette("deep", len(d)))
        ax.errorbar(d[by], d["value"], yerr=[d["value"] - d.ci_low, d.ci_high - d["value"]], fmt="none",
                    color="black", capsize=3)
        ax.set(title=m, ylabel="%")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- paper figures -----------------------------------------------------------------------------
@register("fig1_dleaf_workflow", "D-LEAF on one decoding: LIAE per layer and step, its running threshold, the "
          "cells where it fires, and the captions before and after", paper="Figure 1")
class Fig1:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        """:func:`~dleaf_analysis.studies.examples.dleaf_example` on the test split."""
        from dleaf_analysis.studies import examples

        return examples.dleaf_example(ctx.model(), ctx.n_images, source=ctx.source, tuned_file=ctx.tuned_file)

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        piv = df.pivot_table(index="layer", columns="step", values="liae")
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(10.0, 0.13 * piv.shape[1]), 7.5),
                                      gridspec_kw={"height_ratios": [1.3, 1]})
        sns.heatmap(piv, cmap="viridis", ax=ax, cbar_kws={"label": "LIAE (mean-map)"})
        toks = df.drop_duplicates("step").sort_values("step")["token"].tolist()
        ax.set_xticks(np.arange(len(toks)) + 0.5, toks, rotation=90, fontsize=6)
        f = df[df.fired]
        ax.scatter(f["step"] + 0.5, f["layer"] + 0.5, marker="x", color="red", s=60,
                   label="LIAE above the running threshold: D-LEAF fires")
        ax.legend(loc="upper right", fontsize=8)
        wrap = lambda s: "\n".join(textwrap.wrap(s, 150))  # noqa: E731  (long descriptions)
        ax.set_title(f"{df['example'].iloc[0]}\n" + wrap(f"greedy: {df['greedy_marked'].iloc[0]}") + "\n"
                     + wrap(f"D-LEAF: {df['dleaf_marked'].iloc[0]}  ([x] = hallucinated)"), fontsize=8)
        ax.set_xlabel("")
        counts = f.groupby("layer").size()
        layer = int(counts.idxmax()) if len(counts) else int(df.layer.max())
        d = df[df.layer == layer].sort_values("step")
        ax2.plot(d.step, d.liae, marker="o", label=f"LIAE, layer {layer}")
        ax2.plot(d.step, d.threshold, ls="--", color="black", label=f"running threshold mu + {df['k'].iloc[0]:g} sd")
        fd = d[d.fired]
        ax2.scatter(fd.step, fd.liae, color="red", marker="x", s=70, zorder=3, label="fires")
        ax2.set_xticks(d.step, d.token, rotation=90, fontsize=6)
        ax2.set_xlim(d.step.min() - 0.5, d.step.max() + 0.5)
        ax2.set(ylabel="LIAE", xlabel="generated token (step), greedy decoding")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        return fig


@register("fig2_selective_correction", "Selective correction in visually ambiguous scenes: greedy, uniform (PAI) and "
          "D-LEAF captions", paper="Figure 2")
class Fig2:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        """:func:`~dleaf_analysis.studies.examples.ambiguous_captions` (partner-absent test scenes)."""
        from dleaf_analysis.studies import examples

        df = examples.ambiguous_captions(ctx.model(), ctx.n_images, source=ctx.source, tuned_file=ctx.tuned_file)
        if not len(df):
            raise FigureSkipped(f"greedy hallucinated on none of the first {ctx.n_images} images")
        df.attrs["title"] = "Partner-absent scenes" if ctx.is_scene else "Images where greedy hallucinates"
        return df

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        pictures = df.attrs["images"]
        images = list(dict.fromkeys(df["image"]))
        fig, axes = plt.subplots(len(images), 2, figsize=(13, 4.2 * len(images)), gridspec_kw={"width_ratios": [1, 4.5]},
                                 squeeze=False)
        labels = {"greedy": "greedy", "pai": "uniform (PAI)", "dleaf": "D-LEAF"}
        for r, i in enumerate(images):
            axes[r, 0].imshow(pictures[i])
            axes[r, 0].set_axis_off()
            present = set(df[df.image == i]["present"].iloc[0].split(","))
            ax = axes[r, 1]
            ax.set_axis_off()
            ax.text(0, 0.95, "in the image: " + ", ".join(sorted(present)), fontsize=9, va="top", color="dimgray")
            for k, (_, row) in enumerate(df[df.image == i].iterrows()):  # long descriptions: wrapped
                text = "\n".join(textwrap.wrap(f"{labels[row['method']]}: " + row["marked"], 125,
                                               subsequent_indent="    "))
                ax.text(0, 0.85 - 0.3 * k, text, fontsize=7, va="top", family="monospace",
                        color="firebrick" if row["n_hallucinated"] else "black")
        fig.suptitle(f"{df.attrs.get('title', 'Partner-absent scenes')}: hallucinated objects in [CAPS]")
        fig.tight_layout()
        return fig


@register("fig3_abnormal_heads_by_layer", "Abnormal (corrected) heads per layer and head: rate at hallucinated vs "
          "grounded object tokens of D-LEAF's test captions", paper="Figure 3")
class Fig3:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        """Per (token type, layer, head): how often D-LEAF corrected the head at the steps that emitted
        a hallucinated / grounded object token, divided by the number of such steps."""
        if not ctx.is_scene:
            raise FigureSkipped("it aligns D-LEAF's per-step log with caption words, which holds on the scene "
                                "world's word-level tokenizer only")
        p = ctx.results / "evals" / "chair-test-dleaf" / "interventions.jsonl"
        d = ctx.results / "evals" / "chair-test-dleaf" / "details.jsonl"
        if not d.is_file():
            raise FigureSkipped(f"{d} not found: run `dleaf reproduce` first")
        if not p.is_file():
            raise FigureSkipped("D-LEAF never fired on the test captions: nothing to show")
        from dleaf_analysis.scenes import World
        from dleaf_analysis.studies.examples import correction_rates

        details = pd.read_json(d, lines=True)
        log = pd.read_json(p, lines=True) if p.stat().st_size else pd.DataFrame(columns=["item", "step", "layer", "heads"])
        return correction_rates(details, log, World.load().object_words)

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        vmax = float(df["rate"].max()) or 1.0
        piv = {}
        for ax, t in zip(axes, ["hallucinated object", "grounded object"]):
            d = df[df.token_type == t]
            piv[t] = d.pivot(index="layer", columns="head", values="rate")
            n = int(d["n_steps"].iloc[0]) if len(d) else 0
            sns.heatmap(piv[t], ax=ax, cmap="rocket_r", vmin=0, vmax=vmax, annot=True, fmt=".2f", annot_kws={"size": 7})
            ax.set_title(f"{t} tokens (n = {n} steps)", fontsize=9)
        diff = piv["hallucinated object"] - piv["grounded object"]
        lim = float(np.abs(diff.values).max()) if diff.size else 1.0
        sns.heatmap(diff, ax=axes[2], cmap="RdBu_r", center=0, vmin=-(lim or 1), vmax=lim or 1, annot=True, fmt="+.2f",
                    annot_kws={"size": 7})
        axes[2].set_title("difference (hallucinated - grounded)", fontsize=9)
        fig.suptitle("Rate at which D-LEAF corrects each head (abnormal, low IAF) per emitted object token")
        fig.tight_layout()
        return fig


@register("fig4_suppression_methods", "Change of CHAIR_i against greedy per method on the test images and the fresh "
          "replication pool: every caption, real descriptions only, and against greedy cut to the method's object "
          "count (paired differences, 95% CIs)", paper="Figure 4")
class Fig4:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        c = ctx.table("comparisons.csv")
        want = {("headline", "CHAIR_i"): "CHAIR_i, every caption", ("valid", "CHAIR_i"): "CHAIR_i, real descriptions",
                ("truncation", "objects_CHAIR_i"): "object-list CHAIR_i vs truncated greedy"}
        c = c[[(s, m) in want for s, m in zip(c["section"], c["metric"])]].copy()
        c["comparison"] = [want[(s, m)] for s, m in zip(c["section"], c["metric"])]
        return c[["pool", "method", "comparison", "diff", "ci_low", "ci_high", "n"]].reset_index(drop=True)

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        comps = list(dict.fromkeys(df["comparison"]))
        methods = list(dict.fromkeys(df["method"]))
        pools = list(dict.fromkeys(df["pool"]))
        fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 0.6 * len(methods) + 1.6), sharey=True,
                                 squeeze=False)
        colours = dict(zip(pools, sns.color_palette("deep", len(pools))))
        for ax, comp in zip(axes[0], comps):
            ax.axvline(0, color="grey", lw=0.8)
            for k, pool in enumerate(pools):
                d = df[(df.comparison == comp) & (df.pool == pool)].set_index("method").reindex(methods)
                y = np.arange(len(methods)) + (k - (len(pools) - 1) / 2) * 0.22
                ax.errorbar(d["diff"], y, xerr=[d["diff"] - d.ci_low, d.ci_high - d["diff"]], fmt="o", capsize=3,
                            color=colours[pool], label=f"{pool} (n = {int(d['n'].max()) if d['n'].notna().any() else 0})")
            ax.set(title=comp, xlabel="points (method - reference, same images)")
            ax.title.set_fontsize(9)
            ax.set_yticks(np.arange(len(methods)), methods)
        axes[0, 0].invert_yaxis()
        axes[0, 0].legend(fontsize=7)
        fig.suptitle("Does a method reduce hallucination? Negative = fewer hallucinated objects")
        fig.tight_layout()
        return fig


@register("fig5_liae_by_token_type", "LIAE per layer across object token types (test captions)", paper="Figure 5")
class Fig5:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        """:func:`~dleaf_analysis.studies.examples.liae_by_token_type` on the test split."""
        from dleaf_analysis.studies import examples

        return examples.liae_by_token_type(ctx.model(), ctx.n_images, source=ctx.source)

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        order = ["real object", "hallucinated object", "non-object"]
        sns.boxplot(df, x="layer", y="liae", hue="token_type", hue_order=order, ax=ax, fliersize=1, palette="deep")
        ax.set(title="LIAE distribution across object token types", ylabel="LIAE (mean-map)")
        fig.tight_layout()
        return fig


# -- analyses of the other issues --------------------------------------------------------------
@register("localization_detectors", "Detector vs causal localisation: Spearman and top-k hit per detector")
class Localization:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        return ctx.table("studies/localization/localization_summary.csv")

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        d = df[df.level == "layer"]
        order = sorted(d.detector.unique())
        g = sns.catplot(d, x="mean", y="detector", col="metric", row="causal_map", kind="bar", height=2.4, aspect=1.6,
                        sharex=False, errorbar=None, palette="deep", hue="detector", legend=False, order=order,
                        row_order=sorted(d.causal_map.unique()), col_order=sorted(d.metric.unique()))
        g.set_titles("{row_name} | {col_name}")
        for ax, (_, sub) in zip(g.axes.flat, d.groupby(["causal_map", "metric"], sort=True)):
            sub = sub.set_index("detector").reindex(order)
            ax.errorbar(sub["mean"], np.arange(len(sub)), xerr=[sub["mean"] - sub.ci_low, sub.ci_high - sub["mean"]],
                        fmt="none", color="black", capsize=2)
        g.figure.suptitle("Layer localisation: agreement of detector rankings with causal rankings", y=1.02)
        return g.figure


@register("causal_heatmaps", "Layer x head causal maps (mean over events) next to the IAF map")
class CausalHeatmaps:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        maps = ctx.table("studies/localization/maps.parquet")
        heads = maps[maps["head"] >= 0].groupby(["map", "layer", "head"], as_index=False)["effect"].mean()
        det = ctx.table("studies/localization/detectors.parquet")
        iaf = det[det.detector == "iaf"].groupby(["layer", "head"], as_index=False)["score"].mean()
        # the study stores heads' suspect scores (-IAF: low focus warrants correction); plot IAF itself
        iaf = iaf.assign(map="IAF (image mass) at the event step", effect=-iaf["score"]).drop(columns="score")
        return pd.concat([iaf, heads], ignore_index=True)

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        names = list(dict.fromkeys(df["map"]))
        ncol = 4
        nrow = int(np.ceil(len(names) / ncol))
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.9 * nrow), squeeze=False)
        causal = df[~df["map"].str.startswith("IAF")]
        lim = float(np.abs(causal["effect"]).max()) or 1.0  # one centred scale for every causal map
        for ax, n in zip(axes.flat, names):
            piv = df[df["map"] == n].pivot(index="layer", columns="head", values="effect")
            if n.startswith("IAF"):
                sns.heatmap(piv, ax=ax, cmap="rocket", vmin=0, cbar=True, cbar_kws={"label": "image mass"})
            else:
                sns.heatmap(piv, ax=ax, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, cbar=True)
            ax.set_title(n, fontsize=9)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle("Mean effect on log p(hallucinated) - log p(preferred), one shared colour scale "
                     "(blue = the component carries the hallucination)")
        fig.tight_layout()
        return fig


@register("component_ablation", "D-LEAF components: LIAE only, IAF only, both, static layers (CHAIR, test images)")
class Components:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        s = ctx.table("components.csv")
        return s[s.metric.isin(["CHAIR_s", "CHAIR_i", "recall"]) & (s["pool"] == "test")].reset_index(drop=True)

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        return _metric_bars(df, "component", "Which part of D-LEAF does the work?")


@register("throughput", "Decode-only time per token of each method and capture backend relative to eager greedy "
          "(benchmarks/method_throughput.py)")
class Throughput:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        p = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "method_throughput.csv"
        if not p.is_file():
            raise FigureSkipped(f"{p} not found (it is a benchmark of the checkout, not shipped in the wheel): run "
                                "`python benchmarks/method_throughput.py` in a checkout first")
        df = pd.read_csv(p)
        if not {"vs_eager", "vs_eager_lo", "vs_eager_hi", "ops_vs_eager"} <= set(df.columns):
            raise FigureSkipped(f"{p} is from an older benchmark: re-run `python benchmarks/method_throughput.py`")
        return df

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        df = df.assign(setting=df["model"].str.split(" [(]").str[0] + ", " + df["dtype"])
        methods, settings = list(dict.fromkeys(df["method"])), list(dict.fromkeys(df["setting"]))
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
        w = 0.8 / len(settings)
        for j, s in enumerate(settings):  # CPU time: median of the paired per-repeat ratios, bars = their range
            d = df[df.setting == s].set_index("method").reindex(methods)
            x = np.arange(len(methods)) + (j - (len(settings) - 1) / 2) * w
            axes[0].bar(x, d["vs_eager"], w, label=s, yerr=[d["vs_eager"] - d["vs_eager_lo"],
                                                             d["vs_eager_hi"] - d["vs_eager"]], capsize=2)
            axes[1].bar(x, d["ops_vs_eager"], w, label=s)
        for ax, title in zip(axes, ("CPU time per decoded token (1 thread; range over repeats)",
                                    "aten operators dispatched per token (kernel launches on a GPU)")):
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(methods)), methods, rotation=25, fontsize=8)
            ax.set(ylabel="ratio to eager greedy", title=title)
            ax.title.set_fontsize(9)
        axes[1].axhline(1.10, color="firebrick", lw=0.8, ls="--", label="target for D-LEAF and uniform (1.10x)")
        axes[1].legend(fontsize=7)
        fig.suptitle("Decoding cost per token (prefill excluded), batch 1", fontsize=10)
        fig.tight_layout()
        return fig


@register("sensitivity_curves", "D-LEAF sensitivity on dev: gamma, threshold k, head selection, layers")
class Sensitivity:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        own = ctx.results / "tuning" / "sensitivity.csv"
        if own.is_file():
            return pd.read_csv(own)
        raise FigureSkipped(f"no sensitivity curves in {ctx.results / 'tuning'} (run `dleaf tune` or `dleaf reproduce`)")

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        params = list(dict.fromkeys(df["parameter"]))
        fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.2))
        for ax, p in zip(np.atleast_1d(axes), params):
            d = df[df.parameter == p]
            for m in ("CHAIR_s", "CHAIR_i", "recall"):
                ax.plot(d["param_value"].astype(str), d[m], marker="o", label=m)
            ax.set(title=p, ylabel="%")
            ax.tick_params(axis="x", rotation=30, labelsize=7)
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.suptitle(f"D-LEAF sensitivity around its shipped setting ({int(df['n_images'].iloc[0])} dev images)"
                     if "n_images" in df else "D-LEAF sensitivity around its shipped setting (dev images)")
        fig.tight_layout()
        return fig


@register("pope_by_method", "POPE accuracy and F1 by split and method (test)")
class Pope:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        p = ctx.results / "methods_pope.csv"
        if not p.is_file() or not p.stat().st_size > 1:
            raise FigureSkipped("no POPE results in methods_pope.csv (POPE on COCO: `dleaf pope-coco`)")
        s = pd.read_csv(p)
        s = s[s.metric.isin(["accuracy", "f1"])].reset_index(drop=True)
        if not len(s):
            raise FigureSkipped("no POPE results in methods_pope.csv (POPE on COCO: `dleaf pope-coco`)")
        return s

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        g = sns.catplot(df, x="variant", y="value", hue="method", col="metric", row="pool", kind="bar", height=3,
                        aspect=1.3, palette="deep", errorbar=None)
        g.figure.suptitle("POPE by pool and method (dleaf-vqa: D-LEAF seeded from the prompt rows)", y=1.03)
        return g.figure


@register("dpo_alignment", "DPO alignment (Theorem 1): D-LEAF updates against the random-head null")
class Dpo:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        d = ctx.table("studies/dpo/dpo.parquet")
        long = d.melt(id_vars=["event", "layer", "run", "null"],
                      value_vars=["cos_update_grad", "cos_update_to_preferred", "distance_ratio"],
                      var_name="statistic", value_name="value")
        long["condition"] = np.where(long["null"].astype(bool), "random-head null", "D-LEAF")
        return long

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        # cut=0: no density beyond the observed values (cosines lie in [-1, 1], distance ratios are >= 0)
        g = sns.displot(df, x="value", hue="condition", col="statistic", kind="kde", common_norm=False, cut=0,
                        facet_kws={"sharex": False, "sharey": False}, height=3, aspect=1.2)
        for ax in g.axes.flat:
            ax.axvline(0, color="grey", lw=0.6)
        g.figure.suptitle("Theorem 1, measured: alignment of the corrected embedding", y=1.03)
        return g.figure


@register("image_attention_grid", "Image attention over the image grid: best head and a corrected head, before/after")
class AttentionGrid:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        """:func:`~dleaf_analysis.studies.examples.attention_grid` on the first test image."""
        from dleaf_analysis.studies import examples

        return examples.attention_grid(ctx.model(), source=ctx.source)

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        panels = list(dict.fromkeys(df["panel"]))
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2))
        for ax, p in zip(axes, panels):
            d = df[df.panel == p]
            sns.heatmap(d.pivot(index="y", columns="x", values="attention"), ax=ax, cmap="magma", cbar=False,
                        xticklabels=False, yticklabels=False, square=True)
            ax.set_title(f"{p}\n(layer {d.layer.iloc[0]}, head {d['head'].iloc[0]}, token '{d.token.iloc[0]}')", fontsize=8)
        fig.tight_layout()
        return fig


@register("calibration_detection", "Planted faults: per-step detection AUROC of each layer detector against fault "
          "strength, and the harm each fault does (calibration study)")
class Calibration:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        det = ctx.table("studies/calibration/detection.parquet")
        faults = ctx.table("studies/calibration/faults.parquet")[["fault", "dCHAIR_s", "drecall"]]
        return det.merge(faults, on="fault")

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        # one column per planted fault: where (layer), what (kind), how often (share of steps), how strong
        df = df.assign(fault_label=[f"L{l} {k}\np={p:g}" + ("" if s == 1 else f" s={s:g}")
                                    for l, k, p, s in zip(df.layer, df.kind, df.step_fraction, df.strength)])
        order = list(dict.fromkeys(df.sort_values(["layer", "kind", "step_fraction"], ascending=[True, True, False])
                                   ["fault_label"]))
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.9), gridspec_kw={"width_ratios": [2.2, 1]})
        sns.stripplot(df, x="fault_label", y="auroc", hue="detector", order=order, ax=axes[0], palette="deep",
                      hue_order=sorted(df.detector.unique()), dodge=True, size=5, jitter=False)
        axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[0].set(ylim=(0, 1.02), xlabel="planted fault (layer, kind, share of steps faulted)",
                    ylabel="per-step AUROC (faulted layer)")
        axes[0].set_title("does a detector see the fault at the steps it is planted?", fontsize=9)
        axes[0].tick_params(axis="x", labelsize=7)
        sns.move_legend(axes[0], "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, title=None)
        h = df.drop_duplicates("fault").set_index("fault_label").loc[order].reset_index()
        x = np.arange(len(h))
        axes[1].bar(x - 0.2, h.drecall, 0.4, label="recall")
        axes[1].bar(x + 0.2, h.dCHAIR_s, 0.4, label="CHAIR_s")
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_xticks(x, h.fault_label.str.replace("\n", " "), fontsize=6, rotation=90)
        axes[1].set(title="harm of the fault (paired, vs unfaulted)", ylabel="points")
        axes[1].title.set_fontsize(9)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        return fig


@register("leverage_map", "Leverage map: the cost of a full-strength fault on every head of one layer (recall and "
          "CHAIR_i against unfaulted greedy decoding, paired 95% CIs)")
class LeverageMap:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        return ctx.table("studies/leverage/leverage_summary.parquet")

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for ax, (col, label) in zip(axes, (("drecall", "recall"), ("dCHAIR_i", "CHAIR_i"))):
            ax.bar(df["layer"], df[col], color=sns.color_palette("deep")[0 if col == "drecall" else 3])
            ax.errorbar(df["layer"], df[col], yerr=[df[col] - df[f"{col}_low"], df[f"{col}_high"] - df[col]],
                        fmt="none", color="black", capsize=3)
            ax.axhline(0, color="grey", lw=0.8)
            if col == "drecall":
                ax.axhline(-10, color="firebrick", lw=0.8, ls="--", label="-10 points")
                ax.legend(fontsize=7)
            ax.set(title=f"change of {label} (points)", xlabel="faulted layer (all heads, every step)")
            ax.set_xticks(df["layer"])
        fig.suptitle(f"Where the model reads the image (n = {int(df['n_images'].iloc[0])} images)")
        fig.tight_layout()
        return fig


@register("trigger_firing", "D-LEAF's trigger and each layer detector: firing rate by token type, and precision for "
          "hallucinated object steps against a random trigger with the same per-caption rate")
class TriggerFiring:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        by = ctx.table("studies/trigger/firing_by_type.parquet")
        pr = ctx.table("studies/trigger/precision_recall_summary.parquet")
        long = by.melt(id_vars="trigger", var_name="token type", value_name="firing rate (%)")
        long.attrs["pr"] = pr
        return long.merge(pr[["trigger", "precision", "random_precision", "precision_minus_random_low",
                              "precision_minus_random_high"]], on="trigger")

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
        sns.barplot(df, x="token type", y="firing rate (%)", hue="trigger", ax=axes[0], palette="deep")
        axes[0].tick_params(axis="x", rotation=20, labelsize=8)
        axes[0].set_ylim(0, 132)  # room for the legend above the bars
        axes[0].legend(fontsize=6, ncol=5, loc="upper center")
        axes[0].set_title("how often some candidate layer fires, by the type of the token being predicted", fontsize=9)
        pr = df.drop_duplicates("trigger").reset_index(drop=True)
        y = np.arange(len(pr))
        axes[1].errorbar(100 * (pr["precision"] - pr["random_precision"]), y,
                         xerr=[100 * (pr["precision"] - pr["random_precision"] - pr["precision_minus_random_low"]),
                               100 * (pr["precision_minus_random_high"] - pr["precision"] + pr["random_precision"])],
                         fmt="o", capsize=3)
        for yi in y[pr["precision"].isna().to_numpy()]:
            axes[1].text(0, yi, "never fired at an object step", fontsize=6, va="center", ha="center", color="grey")
        axes[1].axvline(0, color="grey", lw=0.8)
        axes[1].set_yticks(y, pr["trigger"], fontsize=7)
        axes[1].set(xlabel="precision - random trigger (points)", title="better than chance?")
        axes[1].title.set_fontsize(9)
        fig.tight_layout()
        return fig


@register("oracle_outcomes", "D-LEAF's correction with perfect timing: fix, swap and harm rates per layer set at "
          "hallucinated and grounded object steps (teacher-forced greedy captions)")
class OracleOutcomes:
    @staticmethod
    def data(ctx: FigureContext) -> pd.DataFrame:
        t = ctx.table("studies/oracle/oracle_summary.parquet")
        cols = [c for c in t.columns if c.endswith("_rate")]
        return t.melt(id_vars=["steps", "layer_set", "n_steps"], value_vars=cols, var_name="outcome", value_name="rate")

    @staticmethod
    def plot(df: pd.DataFrame) -> plt.Figure:
        d = df[df["outcome"].isin(["fix_rate", "swap_rate", "harm_rate"])]
        g = sns.catplot(d, x="layer_set", y="rate", hue="outcome", col="steps", kind="bar", height=3.2, aspect=1.8,
                        palette="deep", errorbar=None)
        for ax in g.axes.flat:
            ax.tick_params(axis="x", rotation=30, labelsize=8)
            ax.set(ylabel="% of steps", xlabel="layers corrected at that step only")
        g.figure.suptitle("If D-LEAF fired exactly where it should: what its fusion does", y=1.03)
        return g.figure


# -- rendering ---------------------------------------------------------------------------------
def render(name: str, ctx: FigureContext, out: Path = FIGURES_DIR) -> dict:
    """Compute, plot and write one figure (PNG, PDF, CSV); returns its manifest entry."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; choose one of {sorted(FIGURES)}")
    spec = FIGURES[name]
    out.mkdir(parents=True, exist_ok=True)
    np.random.seed(ctx.seed)
    df = spec.data(ctx)
    df.to_csv(out / f"{name}.csv", index=False)
    fig = spec.plot(df)
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    protocol = None
    pfile = ctx.results / "evals" / "chair-test-greedy" / "protocol.json"
    if pfile.is_file():
        protocol = hashlib.sha256(pfile.read_bytes()).hexdigest()[:16]
    return {"figure": name, "title": spec.title, "paper": spec.paper,
            "data_sha256": hashlib.sha256((out / f"{name}.csv").read_bytes()).hexdigest()[:16],
            "protocol_hash": protocol, "command": "dleaf " + " ".join(sys.argv[1:]) if sys.argv else "dleaf figures"}


def render_all(ctx: FigureContext, out: Path = FIGURES_DIR, only: list[str] | None = None,
               log: Callable[[str], None] = print) -> list[dict]:
    """Render every registered figure (or ``only`` those); write ``manifest.json``."""
    names = only or list(FIGURES)
    entries = []
    manifest_file = out / "manifest.json"
    old = {e["figure"]: e for e in json.loads(manifest_file.read_text())} if manifest_file.is_file() else {}
    for n in names:
        log(f"figure {n}")
        try:
            entries.append(render(n, ctx, out))
        except FigureSkipped as e:
            log(f"figure {n} skipped: {e}")
            entries.append({"figure": n, "title": FIGURES[n].title, "paper": FIGURES[n].paper, "skipped": str(e)})
            continue
        old[n] = entries[-1]
    manifest_file.write_text(json.dumps(list(old.values()), indent=1))
    return entries
