"""``dleaf reproduce``: the main job on the embedded model, and its markdown report.

The README's results section is spliced from the report between two markers, so every number
there comes from this code.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from dleaf_analysis.evaluation.runner import evaluate
from dleaf_analysis.tables import md_table
from dleaf_analysis.models.loading import load_model
from dleaf_analysis.paths import REPO_ROOT



def _markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}:start (generated; do not edit) -->", f"<!-- {key}:end -->"


def _wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, method), one column per metric: ``value [lo, hi]`` and, for the
    methods, the paired difference from greedy on the same items ``(d [lo, hi])``; a
    difference whose paired CI excludes 0 is in bold."""
    def diff(d, lo, hi):
        txt = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        return f"**{txt}**" if lo > 0 or hi < 0 else txt
    cell = [f"{v:.1f} [{lo:.1f}, {hi:.1f}]" + ("" if m == "greedy" else f" (d {diff(d, dl, dh)})")
            for v, lo, hi, m, d, dl, dh in zip(df.value, df.ci_low, df.ci_high, df.method, df.paired_diff,
                                               df.paired_ci_low, df.paired_ci_high)]
    w = df.assign(cell=cell).pivot_table(index=["variant", "method"], columns="metric", values="cell", aggfunc="first",
                                         sort=False)
    w = w.reset_index()
    w.columns.name = None
    if (w["variant"] == "all").all():
        w = w.drop(columns="variant")
    return w


METHOD_ORDER = ("greedy", "dleaf", "uniform", "pai", "vcd")


def compare_methods(
    benchmark: str,
    split,
    lm,
    methods: dict[str, dict],
    out: Path,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    label: str | None = None,
) -> pd.DataFrame:
    """Evaluate each method under one protocol; add the relative change against greedy (%) and
    the paired bootstrap difference from greedy on the same items (``paired_diff``, its 95% CI
    ``paired_ci_low/high`` and two-sided ``paired_p``; 0 for greedy itself)."""
    from dleaf_analysis.evaluation.chair import chair_paired
    from dleaf_analysis.evaluation.pope import pope_paired

    if "greedy" not in methods:
        methods = {"greedy": {}, **methods}
    frames, details = [], {}
    for name, cfg in methods.items():
        res = evaluate(benchmark, split, lm, method=name, method_config=cfg, limit=limit, seed=seed,
                       out_dir=out / f"{benchmark}-{label or split}-{name}", progress=progress)
        frames.append(res.summary)
        details[name] = res.details
    df = pd.concat(frames, ignore_index=True)
    paired = [{"method": "greedy", "variant": va, "metric": me, "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0,
               "p_two_sided": 1.0} for va, me in zip(df[df.method == "greedy"].variant, df[df.method == "greedy"].metric)]
    for name, det in details.items():
        if name == "greedy":
            continue
        if benchmark == "chair":
            d = chair_paired(details["greedy"], det, seed=seed).assign(variant="all")
        else:
            d = pope_paired(details["greedy"], det, seed=seed)
        paired += d.assign(method=name).to_dict(orient="records")
    pt = pd.DataFrame(paired).set_index(["method", "variant", "metric"])
    key = list(zip(df.method, df.variant, df.metric))
    df["paired_diff"] = [pt.loc[k, "diff"] for k in key]
    df["paired_ci_low"] = [pt.loc[k, "ci_low"] for k in key]
    df["paired_ci_high"] = [pt.loc[k, "ci_high"] for k in key]
    df["paired_p"] = [pt.loc[k, "p_two_sided"] for k in key]
    base = df[df.method == "greedy"].set_index(["variant", "metric"])["value"]
    df["rel_change_vs_greedy"] = [
        100 * (v - base.loc[(va, me)]) / base.loc[(va, me)] if base.loc[(va, me)] else float("nan")
        for va, me, v in zip(df["variant"], df["metric"], df["value"])
    ]
    return df


def reproduce(
    out: str | Path = "results",
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    update_readme: bool = False,
    figures_dir: Path | None = None,
    lm=None,
) -> pd.DataFrame:
    """Run the analysis; write ``out/report.md`` and per-benchmark results.  Returns the summary.

    ``quick`` runs a smoke-size version (a few images).  The README is updated only when asked
    (``update_readme``), and never by a quick run.  Figures go to ``figures_dir`` (default:
    ``out/figures``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    limit = 24 if quick else None
    lm = lm or load_model()  # the embedded model (any device / dtype the caller loaded it on)
    from dleaf_analysis.settings import tuned_config

    methods = {m: tuned_config(m, lm.weights_hash) for m in METHOD_ORDER}
    tables = {}
    for bench in ("chair", "pope"):
        log(f"evaluating {len(methods)} methods with {bench} on the test split" + (" (quick)" if quick else ""))
        tables[bench] = compare_methods(bench, "test", lm, methods, out, limit=limit, seed=seed, progress=progress)
    summary = pd.concat(tables.values(), ignore_index=True)
    summary.to_csv(out / "summary.csv", index=False)
    protocol = json.loads((out / "chair-test-greedy" / "protocol.json").read_text())
    body = [
        "## Methods on the embedded model (test split)",
        "",
        "Values in percent (length in words) with bootstrap 95% CIs; `d` is the paired difference from",
        "greedy decoding on the same images (points; paired bootstrap over images, 95% CI; bold where",
        "the CI excludes 0). Methods run at the settings chosen by the tuning study on the dev split",
        "(`data/tuned_methods.json`).",
        "",
        "### CHAIR (captioning)",
        "",
        md_table(_wide(tables["chair"])),
        "",
        "### POPE",
        "",
        md_table(_wide(tables["pope"])),
        "",
        f"Protocol (greedy CHAIR; the others differ only in `method`): {protocol['model_id']} weights "
        f"`{protocol['weights_hash']}`, data `{protocol['split_hash']}`, {protocol['n_items']} images, prompt "
        f"`{protocol['prompt']}`, max {protocol['max_new_tokens']} new tokens, seed {protocol['seed']}.",
    ]
    body += _components_section(out, lm, limit, seed, progress, log, tables["chair"])
    body += _studies_section(out, quick, seed, progress, log, lm)
    body += _figures_section(out, quick, seed, log, lm, figures_dir)
    report = [f"# dleaf-analysis report{' (quick)' if quick else ''}", "",
              f"Generated by `dleaf reproduce{' --quick' if quick else ''}` in {time.time() - t0:.0f} s.", ""] + body
    (out / "report.md").write_text("\n".join(report) + "\n")
    if update_readme and not quick:
        splice_readme("\n".join(body), "results")
    return summary


def reproduce_source(
    out: str | Path,
    lm,
    source,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    figures_dir: Path | None = None,
    tuned_file: str | Path | None = None,
    tune_fraction: float = 0.25,
    shard: tuple[int, int] | None = None,
    batch_size: int | None = None,
    study_limit: int | None = None,
) -> pd.DataFrame:
    """The main job on a real checkpoint and an image source (COCO, an annotated folder).

    Without ``tuned_file``, the methods are first tuned on a held-out part of the images
    (``tune_fraction``, chosen by hash of the image key: :meth:`ImageSource.split_heldout`),
    disjoint from the evaluation images; the tuned settings are saved next to the results
    (``out/tuning/tuned_methods.json``, keyed by the model's weights hash).  Then CHAIR of every
    method with paired differences, D-LEAF's component ablation, the localisation, DPO and
    calibration studies, the figures and ``out/report.md``.  ``shard=(i, N)``: only shard ``i`` of
    the evaluation images (and of the fault grid); needs ``tuned_file`` (tune once, first).
    """
    from dleaf_analysis.evaluation.tuning import tune
    from dleaf_analysis.settings import tuned_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    source.check_model(lm)
    if shard is not None and tuned_file is None:
        raise ValueError("a sharded reproduce needs the tuned settings (--tuned FILE): tune once first, with "
                         "`dleaf tune` on a held-out image list")
    tune_src = None
    if tuned_file is None:
        tune_src, eval_src = source.split_heldout(tune_fraction)
        (out / "tuning_images.txt").write_text("\n".join(tune_src.key(i) for i in range(len(tune_src))) + "\n")
        log(f"tuning the methods on {len(tune_src)} held-out images (disjoint from the {len(eval_src)} evaluation images)")
        tune(out / "tuning", lm=lm, source=tune_src, exclude=eval_src, limit=4 if quick else None, seed=seed,
             progress=progress, log=log)
        tuned_file = out / "tuning" / "tuned_methods.json"
    else:
        eval_src = source
    if shard is not None:
        eval_src = eval_src.shard(*shard)
    (out / "evaluation_images.txt").write_text("\n".join(eval_src.key(i) for i in range(len(eval_src))) + "\n")
    limit = 6 if quick else None
    methods = {m: tuned_config(m, lm.weights_hash, tuned_file) for m in METHOD_ORDER}
    log(f"evaluating {len(methods)} methods with CHAIR on {len(eval_src) if limit is None else min(limit, len(eval_src))} "
        "evaluation images")
    chair = compare_methods("chair", eval_src, lm, methods, out, limit=limit, seed=seed, progress=progress, label="test")
    chair.to_csv(out / "summary.csv", index=False)
    protocol = json.loads((out / "chair-test-greedy" / "protocol.json").read_text())
    body = [
        f"## Methods on {lm.model_id} ({source.kind} images)",
        "",
        "Values in percent (length in words) with bootstrap 95% CIs; `d` is the paired difference from greedy decoding",
        "on the same images (points; paired bootstrap over images, 95% CI; bold where the CI excludes 0). Methods run",
        f"at the settings tuned on held-out images of this model (`{Path(tuned_file).name}`).",
        "",
        "### CHAIR (captioning)",
        "",
        md_table(_wide(chair)),
        "",
        f"Protocol (greedy CHAIR; the others differ only in `method`): {protocol['model_id']} weights "
        f"`{protocol['weights_hash']}`, images `{protocol['split_hash']}`, {protocol['n_items']} images, prompt "
        f"`{protocol['prompt']}`, max {protocol['max_new_tokens']} new tokens, seed {protocol['seed']}.",
    ]
    body += _components_section(out, lm, limit, seed, progress, log, chair, source=eval_src,
                                profile_source=tune_src or eval_src, tuned_file=tuned_file)
    body += _studies_section(out, quick, seed, progress, log, lm, source=eval_src, calib_source=tune_src or eval_src,
                             tuned_file=tuned_file, limit=study_limit or (6 if quick else None), batch_size=batch_size)
    body += _figures_section(out, quick, seed, log, lm, figures_dir, source=eval_src, tuned_file=tuned_file)
    title = f"# dleaf-analysis report: {lm.model_id} on {source.kind} images{' (quick)' if quick else ''}"
    if shard is not None:
        title += f", shard {shard[0]}/{shard[1]}"
    report = [title, "", f"Generated by `dleaf reproduce` in {time.time() - t0:.0f} s.", ""] + body
    (out / "report.md").write_text("\n".join(report) + "\n")
    return chair


def component_configs(lm, seed: int = 0, source=None, tuned_file=None) -> dict[str, dict]:
    """D-LEAF's component ablation: which part does the work?

    - ``both (D-LEAF)``: LIAE picks layers, IAF picks heads (the tuned config);
    - ``LIAE only``: LIAE picks layers, every head but the best is fused;
    - ``IAF only``: every candidate layer at every step, IAF picks heads (uniform fusion);
    - ``static layers``: the two candidate layers with the highest mean LIAE on dev captions,
      every step, every head but the best (``source``: the first 40 of its images instead of dev).
    """
    from dleaf_analysis.settings import tuned_config
    from dleaf_analysis.interventions import DLeaf
    from dleaf_analysis.scenes import load_split
    from dleaf_analysis.tracing import trace_generation

    base = {**DLeaf().to_dict(), **tuned_config("dleaf", lm.weights_hash, tuned_file)}
    base.pop("method")
    if source is None:
        dev = load_split("dev", limit=40)
        liae = torch.stack([trace_generation(lm, dev.image(i), backend="hooks").liae().mean(0)
                            for i in range(len(dev))]).mean(0)
    else:
        dev = source.limit(40)
        liae = torch.stack([trace_generation(lm, dev.image(i), prompt=dev.prompt, max_new_tokens=dev.max_new_tokens,
                                             backend="hooks").liae().mean(0) for i in range(len(dev))]).mean(0)
    cand = DLeaf(**base).candidate_layers(len(liae))
    static = sorted(sorted(cand, key=lambda l: -float(liae[l]))[:2])
    return {
        "both (D-LEAF)": base,
        "LIAE only": {**base, "head_selection": "all"},
        "IAF only": {**base, "threshold": "static"},
        "static layers": {**base, "threshold": "static", "layers": static, "head_selection": "all"},
    }


def _components_section(out: Path, lm, limit, seed, progress, log, chair: pd.DataFrame, source=None,
                        profile_source=None, tuned_file=None) -> list[str]:
    where = "test" if source is None else "evaluation images"
    log(f"component ablation of D-LEAF (CHAIR, {where})")
    rows = []
    for label, cfg in component_configs(lm, seed, profile_source, tuned_file).items():
        res = evaluate("chair", source or "test", lm, method="dleaf", method_config=cfg, limit=limit, seed=seed,
                       progress=progress, out_dir=out / f"components-{label.split()[0].lower()}")
        rows.append(res.summary.assign(component=label, layers=json.dumps(cfg.get("layers"))))
    g = chair[chair.method == "greedy"].assign(component="greedy (none)", layers="null")
    df = pd.concat([g] + rows, ignore_index=True)
    df.to_csv(out / "components.csv", index=False)
    df["cell"] = [f"{v:.1f} [{lo:.1f}, {hi:.1f}]" for v, lo, hi in zip(df.value, df.ci_low, df.ci_high)]
    w = df.pivot_table(index="component", columns="metric", values="cell", aggfunc="first", sort=False).reset_index()
    w.columns.name = None
    static = df[df.component == "static layers"]["layers"].iloc[0]
    prof = "dev captions" if profile_source is None else "captions of the tuning images"
    return ["", f"### D-LEAF component ablation (CHAIR, {where})", "",
            f"LIAE picks layers, IAF picks heads; `static layers` = {static} (highest mean LIAE on {prof}).", "",
            md_table(w[["component", "CHAIR_s", "CHAIR_i", "recall", "length"]]), ""]


def _studies_section(out: Path, quick: bool, seed: int, progress: bool, log, lm, source=None, calib_source=None,
                     tuned_file=None, limit: int | None = None, batch_size: int | None = None) -> list[str]:
    """Run the localisation and DPO studies on the test split (or ``source``); their report section."""
    from dleaf_analysis.studies.runner import NoEventsError, run_study

    limit = limit or (30 if quick else 300)
    where = "test split" if source is None else "evaluation images"
    lines = ["", f"## Causal studies ({where}, first {limit} images)", ""]
    kw = dict(limit=limit, out=out / "studies", lm=lm, seed=seed, progress=progress, tuned_file=tuned_file,
              batch_size=batch_size)
    try:
        log("localisation study (ablation, correction and patching maps vs detectors)")
        loc = run_study("localization", source or "test", **kw)
        log("DPO alignment study")
        dp = run_study("dpo", source or "test", **kw)
    except NoEventsError as e:
        return lines + [f"No study could run: {e}"]
    s = loc.summary
    lines += [
        f"Events: {s['n_hallucinated']} hallucinated object tokens in greedy captions of {s['n_images']} images; "
        f"{s['n_with_preferred']} have a preferred alternative (a present, not yet mentioned object) and are "
        f"studied; {s['n_with_cue']} of them also have a cue object for counterfactual patching.",
        "",
        "### Does LIAE localise better than the uniform detectors?",
        "",
    ] + [f"- {v}" for v in s["verdict"]] + [
        "",
        "Layer-level agreement with each causal map (mean over events, bootstrap 95% CI; causal score = how much "
        "intervening on the layer suppresses the hallucination):",
        "",
    ]
    t = loc.tables["localization_summary"]
    lay = t[(t.level == "layer")].copy()
    lay["value"] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(lay["mean"], lay.ci_low, lay.ci_high)]
    w = lay.pivot_table(index=["causal_map", "detector"], columns="metric", values="value", aggfunc="first").reset_index()
    w.columns.name = None
    lines += [md_table(w), ""]
    hd = t[(t.level == "head") & (t.metric == "spearman")].copy()
    hd["spearman"] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(hd["mean"], hd.ci_low, hd.ci_high)]
    w = hd.pivot_table(index="detector", columns="causal_map", values="spearman", aggfunc="first").reset_index()
    w.columns.name = None
    lines += ["Head-level (within each layer; detector score = low focus, i.e. heads that warrant correction), "
              "Spearman:", "", md_table(w), "",
              f"Attribution patching vs exact head patching: Spearman {s['attribution_vs_exact_spearman']:.3f} over all "
              "(event, layer, head) cells. Attribution is the exact first-order term of head patching (tested against "
              "a 1% step toward the counterfactual: agreement within 2%); what separates it from a full patch is the "
              "model's nonlinearity.", ""]
    lines += [f"Events where the cue would have been the model's top preferred object (the next present object "
              f"was taken instead, never the cue): {s.get('n_cue_was_top_preferred', 0)}.", ""]
    lines += ["### DPO alignment (Theorem 1)", ""]
    ds = dp.tables.get("dpo_summary")
    if ds is None or not len(ds):
        lines += ["No event had a layer where D-LEAF fires: nothing to measure."]
    else:
        d2 = ds.copy()
        d2["D-LEAF"] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(d2.dleaf_mean, d2.dleaf_ci_low, d2.dleaf_ci_high)]
        d2["random-head null"] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(d2.null_mean, d2.null_ci_low, d2.null_ci_high)]
        d2["one-sided Wilcoxon p"] = [f"{p:.3g} ({a})" for p, a in zip(d2.wilcoxon_p, d2.alternative)]
        lines += [f"{dp.summary.get('n_events_fired', 0)} events with at least one firing layer "
                  f"({dp.summary.get('n_events_not_fired', 0)} without); one row per (event, corrected layer):", "",
                  md_table(d2[["statistic", "D-LEAF", "random-head null", "n", "one-sided Wilcoxon p"]]), ""]
    lines += _calibration_section(out, quick, seed, progress, log, lm, calib_source, tuned_file)
    return lines


def _calibration_section(out: Path, quick: bool, seed: int, progress: bool, log, lm, source=None,
                         tuned_file=None) -> list[str]:
    """The planted-fault calibration study on dev (or ``source``): what each detector and method can see."""
    from dleaf_analysis.models.adapters import ModelAdapter
    from dleaf_analysis.studies.calibration import default_faults
    from dleaf_analysis.studies.runner import run_study

    limit = 6 if quick else 60
    ad = ModelAdapter(lm.model)
    faults = default_faults(ad.n_layers, ad.n_heads, seed)
    if quick:
        faults = [f for f in faults if f.strength == 1.0][:2]
    where = "dev" if source is None else "tuning"
    if source is not None:
        limit = min(limit, len(source))
    log(f"calibration study: {len(faults)} planted faults on {limit} {where} images")
    r = run_study("calibration", source or "dev", limit=limit, out=out / "studies", lm=lm, seed=seed, progress=progress,
                  faults=faults, tuned_file=tuned_file)
    t = r.tables
    lines = [f"### Calibration: planted faults ({where} images)", "",
             f"Each fault is planted through the hook point while the model decodes the first {limit} {where} images "
             "(kinds, layers, heads, strengths: docs/method.md). Harm is the paired change against the unfaulted "
             "run on the same images; detection is the per-step AUROC of each layer detector for the faulted layer "
             "(0.5 = blind) and its top-1 hit rate among D-LEAF's candidate layers (base rate in brackets).", ""]
    f = t["faults"].copy()
    f["fault"] = [f"{k} L{l} heads {h} s={s:g} p={p:g}" for k, l, h, s, p in
                  zip(f.kind, f.layer, f.heads, f.strength, f.step_fraction)]
    f["dCHAIR_s"] = [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in zip(f.dCHAIR_s, f.dCHAIR_s_low, f.dCHAIR_s_high)]
    f["drecall"] = [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in zip(f.drecall, f.drecall_low, f.drecall_high)]
    d = t["detection"].copy()
    d["fault"] = [f"{k} L{l} heads {h} s={s:g} p={p:g}" for k, l, h, s, p in
                  zip(d.kind, d.layer, d.heads, d.strength, d.step_fraction)]
    d["cell"] = [f"{a:.2f} / {h:.2f} ({b:.2f})" for a, h, b in zip(d.auroc, d.top1_hit, d.top1_base_rate)]
    w = d.pivot_table(index="fault", columns="detector", values="cell", aggfunc="first", sort=False).reset_index()
    w.columns.name = None
    lines += [md_table(f[["fault", "dCHAIR_s", "drecall"]]), "",
              "Detection, `AUROC / top-1 hit (base rate)` per detector:", "", md_table(w), ""]
    rec = t["recovery"].copy()
    if len(rec):
        rec["fault"] = [f"{k} L{l} s={s:g} p={p:g}" for k, l, s, p in zip(rec.kind, rec.layer, rec.strength,
                                                                            rec.step_fraction)]
        rec["cell"] = [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in
                       zip(rec.dCHAIR_s_vs_faulted, rec.dCHAIR_s_vs_faulted_low, rec.dCHAIR_s_vs_faulted_high)]
        rw = rec.pivot_table(index="fault", columns="method", values="cell", aggfunc="first", sort=False).reset_index()
        rw.columns.name = None
        lines += ["Recovery: change of CHAIR_s when each method decodes with the fault in place, against the faulted "
                  "greedy run (paired, points; negative = fewer hallucinations; `oracle` = D-LEAF's fusion exactly at "
                  "the faulted steps and heads):", "", md_table(rw), ""]
    iaf = t["iaf"]
    if len(iaf):
        lines += [f"IAF at faulted steps: the best head is an intact head in {100 * iaf.best_is_intact.mean():.0f}% of "
                  f"them (mean over faults); D-LEAF's head rule selects {100 * iaf.faulted_selected.mean():.0f}% of the "
                  f"faulted heads and {100 * iaf.intact_selected.mean():.0f}% of the intact ones.", ""]
    c = t["causal"]
    if len(c):
        lines += [f"Causal maps on {len(c)} hallucination events of the faulted captions: `correct_layer` ranks the "
                  f"faulted layer first in {100 * c.correct_layer_top1_is_faulted.mean():.0f}% of them, `layer_zero` in "
                  f"{100 * c.layer_zero_top1_is_faulted.mean():.0f}% (chance {100 / ad.n_layers:.0f}%).", ""]
    return lines


def _figures_section(out: Path, quick: bool, seed: int, log, lm, figures_dir: Path | None, source=None,
                     tuned_file=None) -> list[str]:
    from dleaf_analysis.figures import FigureContext, render_all

    fdir = figures_dir or out / "figures"
    log(f"figures -> {fdir}")
    entries = render_all(FigureContext(results=out, lm=lm, n_images=8 if quick else 100, seed=seed, source=source,
                                       tuned_file=tuned_file), fdir, log=log)
    rel = lambda p: p.resolve().relative_to(REPO_ROOT.resolve()) if p.resolve().is_relative_to(REPO_ROOT.resolve()) else p  # noqa: E731
    lines = ["", "## Figures", ""]
    for e in entries:
        paper = f" ({e['paper']} of the paper)" if e["paper"] else ""
        lines.append(f"- [{e['figure']}]({rel(fdir / (e['figure'] + '.png'))}){paper}: {e['title']}")
    return lines


def splice_readme(text: str, key: str, readme: Path = REPO_ROOT / "README.md") -> None:
    """Replace the README's generated section ``key`` (between its two markers)."""
    start, end = _markers(key)
    s = readme.read_text()
    pattern = re.escape(start) + ".*?" + re.escape(end)
    if not re.search(pattern, s, flags=re.S):
        raise RuntimeError(f"README has no markers for section {key!r} ({start} ... {end})")
    s = re.sub(pattern, lambda _: f"{start}\n{text}\n{end}", s, flags=re.S)
    readme.write_text(s)
