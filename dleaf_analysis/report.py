"""``dleaf reproduce``: the main job, one pipeline for every model and image source, and its report.

For the embedded model on the scene world (default) and for a real checkpoint with COCO or an
annotated folder alike:

1. **pools**: the evaluation images (scene world: ``test``, 500) and a **replication pool** of
   fresh images never used for tuning (scene world: ``replication``, 2,000; a real source: the
   images left after the tuning hold-out, split in two by hash of the image key);
2. **methods** (greedy, D-LEAF, uniform fusion, PAI, VCD at their shipped or tuned settings) with
   CHAIR on both pools: the headline paired differences against greedy, the **degenerate-output
   rates**, the differences on the images where both captions are real descriptions, and the
   method against the **length-matched truncation baseline** (greedy's object list cut to the
   method's object count), with a verdict; POPE on both pools (D-LEAF with prompt-row seeding,
   so that it can act on a one-token answer, and its firing rate);
3. D-LEAF's **component ablation** under the same comparison;
4. the **studies** on the first ``study_limit`` tuning/dev images: leverage map, trigger,
   oracle, localisation, DPO alignment and calibration (faults planted where the leverage map
   finds leverage);
5. the **figures**, ``report.md`` with the findings in prose above the tables, and (with
   ``update_readme``) ``RESULTS.md`` and the README's findings.

Every number in the report is computed here from the shipped code; nothing is typed in.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from dleaf_analysis import distributed
from dleaf_analysis.evaluation.chair import chair_paired
from dleaf_analysis.evaluation.pope import pope_paired
from dleaf_analysis.evaluation.runner import evaluate
from dleaf_analysis.evaluation.validity import compare
from dleaf_analysis.models.loading import load_model
from dleaf_analysis.paths import REPO_ROOT
from dleaf_analysis.tables import md_table

METHOD_ORDER = ("greedy", "dleaf", "uniform", "pai", "vcd")
POOLS = ("test", "replication")
STUDY_ORDER = ("leverage", "trigger", "oracle", "localization", "dpo", "calibration")


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}:start (generated; do not edit) -->", f"<!-- {key}:end -->"


def _ci(v, lo, hi, signed: bool = False, digits: int = 1) -> str:
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]"


def _bold_if(txt: str, lo, hi) -> str:
    return f"**{txt}**" if (lo > 0 or hi < 0) else txt


# -- pools and methods ---------------------------------------------------------------------------------
def pools(lm, source=None, quick: bool = False, tuned_file=None, tune_fraction: float = 0.25, shard=None,
          out: Path | None = None, log=print, seed: int = 0, progress: bool = True,
          pool_limit: int | None = None) -> tuple[dict, object, object]:
    """``({pool: source}, study_source, tuned_file)``: the evaluation and replication images, the
    images the studies run on, and the tuned settings (a real source without ``tuned_file`` is tuned
    first on a held-out part of its images, disjoint from both pools).  ``pool_limit``: the first N
    images of each scene-world pool (test, replication)."""
    from dleaf_analysis.sources import SceneSource, parse_shard

    if source is None:
        n = 6 if quick else pool_limit
        pool = {"test": SceneSource.load("test", limit=n), "replication": SceneSource.load("replication", limit=n)}
        return pool, SceneSource.load("dev"), tuned_file
    source.check_model(lm)
    if tuned_file is None:
        from dleaf_analysis.evaluation.tuning import tune

        tune_src, rest = source.split_heldout(tune_fraction)
        if distributed.writer():
            (out / "tuning_images.txt").write_text("\n".join(tune_src.key(i) for i in range(len(tune_src))) + "\n")
        conf, tune_src = tune_src.split_heldout(0.3) if len(tune_src) >= 4 else (None, tune_src)
        log(f"tuning on {len(tune_src)} held-out images, confirming on {len(conf) if conf else 0} (disjoint from the "
            f"{len(rest)} evaluation images)")
        tune(out / "tuning", lm=lm, source=tune_src.limit(4 if quick else None), confirm=conf, exclude=rest,
             seed=seed, progress=progress, log=log, sensitivity_limit=4 if quick else 100)
        tuned_file = out / "tuning" / "tuned_methods.json"
        study_src = tune_src
    else:
        rest, study_src = source, source
    a, b = rest.split_heldout(0.5) if len(rest) >= 2 else (rest, rest)
    pool = {"test": b, "replication": a}
    if shard is not None:
        i, n = parse_shard(shard) if isinstance(shard, str) else shard
        pool = {k: v.shard(i, n) for k, v in pool.items()}
    if quick:
        pool = {k: v.limit(6) for k, v in pool.items()}
    if out is not None and distributed.writer():
        for k, v in pool.items():
            (out / f"{k}_images.txt").write_text("\n".join(v.key(i) for i in range(len(v))) + "\n")
    return pool, study_src, tuned_file


def method_configs(lm, tuned_file=None, tuned_any: bool = False) -> dict[str, dict]:
    """The settings each method runs at (tuned and confirmed for this model, else its defaults)."""
    from dleaf_analysis.settings import tuned_config

    strict = tuned_file is not None and not tuned_any
    return {m: tuned_config(m, lm.weights_hash, tuned_file, strict=strict) for m in METHOD_ORDER}


def compare_methods(benchmark: str, pool: str, source, lm, methods: dict[str, dict], out: Path, seed: int = 0,
                    progress: bool = True, log=print) -> tuple[pd.DataFrame, dict]:
    """Evaluate each method on one pool (resumable: ``out/evals/<benchmark>-<pool>-<method>``); the long
    summary with the paired difference from greedy on the same items, and the results by method."""
    res = {}
    for name, cfg in methods.items():
        method = "dleaf" if name == "dleaf-vqa" else name
        log(f"{benchmark} · {pool} ({len(source)} images) · {name}")
        res[name] = evaluate(benchmark, source, lm, method=method, method_config=cfg, seed=seed, progress=progress,
                             out_dir=out / "evals" / f"{benchmark}-{pool}-{name}")
    frames = []
    for name, r in res.items():
        s = r.summary.assign(method=name, pool=pool)
        if name == "greedy":
            s = s.assign(paired_diff=0.0, paired_ci_low=0.0, paired_ci_high=0.0)
        else:
            d = (chair_paired(res["greedy"].details, r.details, seed=seed).assign(variant="all") if benchmark == "chair"
                 else pope_paired(res["greedy"].details, r.details, seed=seed)).set_index(["variant", "metric"])
            key = list(zip(s["variant"], s["metric"]))
            s = s.assign(paired_diff=[d.loc[k, "diff"] for k in key], paired_ci_low=[d.loc[k, "ci_low"] for k in key],
                         paired_ci_high=[d.loc[k, "ci_high"] for k in key])
        frames.append(s)
    return pd.concat(frames, ignore_index=True), res


def comparison_rows(pool: str, results: dict, seed: int = 0, label: str = "method") -> tuple[pd.DataFrame, dict]:
    """For every method of one pool: :func:`~dleaf_analysis.evaluation.validity.compare` against greedy
    as long rows (``section`` = headline / valid / truncation) and the verdicts."""
    rows, verdicts = [], {}
    for name, r in results.items():
        if name == "greedy":
            continue
        c = compare(results["greedy"].details, r.details, seed=seed)
        verdicts[name] = c["verdict"]
        for section in ("headline", "valid", "truncation"):
            t = c[section]
            for rec in t.to_dict(orient="records") if len(t) else []:
                rows.append({"pool": pool, label: name, "section": section, **rec,
                             "n_valid": c["n_valid"], "n_images": c["n_images"]})
        v = c["validity"].set_index("caption")
        rows.append({"pool": pool, label: name, "section": "validity", "metric": "degenerate", "diff":
                     v.loc["method", "degenerate"] - v.loc["greedy", "degenerate"], "method_value": v.loc["method", "degenerate"],
                     "greedy_value": v.loc["greedy", "degenerate"], "n_valid": c["n_valid"], "n_images": c["n_images"],
                     **{f"method_{k}": v.loc["method", k] for k in ("yes/no", "no object", "not a description")}})
    return pd.DataFrame(rows), verdicts


def component_configs(lm, profile_source, tuned_file=None, tuned_any: bool = False) -> dict[str, dict]:
    """D-LEAF's component ablation: which part does the work?

    - ``both (D-LEAF)``: LIAE picks layers, IAF picks heads (the shipped config);
    - ``LIAE only``: LIAE picks layers, every head but the best is fused;
    - ``IAF only``: every candidate layer at every step, IAF picks heads (uniform fusion);
    - ``static layers``: the two candidate layers with the highest mean LIAE on the captions of the
      first 40 images of ``profile_source``, every step, every head but the best.
    """
    import torch

    from dleaf_analysis.interventions import DLeaf
    from dleaf_analysis.tracing import trace_generation

    base = {k: v for k, v in DLeaf.from_dict(method_configs(lm, tuned_file, tuned_any)["dleaf"]).to_dict().items()
            if k != "method"}
    prof = profile_source.limit(40)
    liae = torch.stack([trace_generation(lm, prof.image(i), prompt=prof.prompt, max_new_tokens=prof.max_new_tokens,
                                         backend="hooks").liae().mean(0) for i in range(len(prof))]).mean(0)
    cand = DLeaf(**base).candidate_layers(len(liae))
    static = sorted(sorted(cand, key=lambda l: -float(liae[l]))[:2])
    return {"both (D-LEAF)": base, "LIAE only": {**base, "head_selection": "all"},
            "IAF only": {**base, "threshold": "static"},
            "static layers": {**base, "threshold": "static", "layers": static, "head_selection": "all"}}


# -- studies --------------------------------------------------------------------------------------------
def run_studies(lm, source, out: Path, quick: bool, seed: int, progress: bool, log, tuned_file=None,
                tuned_any: bool = False, study_limit: int | None = None, batch_size: int | None = None) -> dict:
    """Every study of :data:`STUDY_ORDER` on the first ``study_limit`` images of ``source`` (calibration
    on fewer, its faults where the leverage map finds leverage); ``{name: StudyResult or message}``."""
    from dleaf_analysis.studies import NoEventsError, run_study
    from dleaf_analysis.studies.calibration import leverage_faults

    n = study_limit or (6 if quick else 300)  # quick: the first 6 dev images hold hallucination events
    kw = dict(out=out / "studies", lm=lm, seed=seed, progress=progress, tuned_file=tuned_file, tuned_any=tuned_any,
              batch_size=batch_size, log=log)
    got: dict = {}
    for name in STUDY_ORDER:
        limit = {"calibration": 3 if quick else 60, "leverage": n, "localization": min(n, 6 if quick else 150),
                 "dpo": min(n, 6 if quick else 150)}.get(name, n)
        opts = None
        if name == "calibration":
            lev = got.get("leverage")
            opts = {"faults": [f.__dict__ | {"heads": list(f.heads)} for f in
                               leverage_faults(lev.tables["leverage_summary"] if hasattr(lev, "tables") else None,
                                               lm, seed, quick)]}
        log(f"study: {name} on the first {limit} images")
        try:
            got[name] = run_study(name, source, limit=limit, options=opts, **kw)
        except NoEventsError as e:
            got[name] = str(e)
    return got


# -- findings ---------------------------------------------------------------------------------------------
def _get(t: pd.DataFrame, **where) -> pd.Series | None:
    m = t
    for k, v in where.items():
        m = m[m[k] == v]
    return m.iloc[0] if len(m) else None


def findings(comparisons: pd.DataFrame, verdicts: dict, pope: pd.DataFrame, studies: dict,
             pope_firing: pd.DataFrame | None = None) -> list[str]:
    """The report's findings in prose: one sentence each, with its number, CI and n, positive or not."""
    out = []
    for pool in POOLS:
        h = _get(comparisons, pool=pool, method="dleaf", section="headline", metric="CHAIR_i")
        t = _get(comparisons, pool=pool, method="dleaf", section="truncation", metric="objects_CHAIR_i")
        if h is not None:
            txt = (f"On the {pool} images (n = {int(h['n'])}), D-LEAF changes CHAIR_i by "
                   f"{_ci(h['diff'], h['ci_low'], h['ci_high'], True, 2)} points against greedy decoding")
            if t is not None:
                txt += (f", and object-list CHAIR_i by {_ci(t['diff'], t['ci_low'], t['ci_high'], True, 2)} against "
                        f"greedy cut to the same number of objects (n = {int(t['n'])} images with two real descriptions)")
            out.append(txt + f"; verdict: {verdicts.get((pool, 'dleaf'), 'n/a').split(': ')[-1]}.")
    for pool in POOLS:
        best = None
        for m in ("uniform", "pai", "vcd"):
            t = _get(comparisons, pool=pool, method=m, section="truncation", metric="objects_CHAIR_i")
            if t is not None and (best is None or t["diff"] < best[1]["diff"]):
                best = (m, t)
        if best is not None and pool == "replication":
            m, t = best
            out.append(f"Of the baselines, {m} comes closest to beating the truncation control on the replication pool: "
                       f"object-list CHAIR_i {_ci(t['diff'], t['ci_low'], t['ci_high'], True, 2)} "
                       f"(n = {int(t['n'])}); {verdicts.get((pool, m), '').split(': ')[-1]}.")
    tr = studies.get("trigger")
    if hasattr(tr, "tables"):
        pr = tr.tables["precision_recall_summary"]
        d = _get(pr, trigger="dleaf")
        if d is not None:
            txt = (f"D-LEAF's trigger fires at {100 * tr.summary['dleaf_firing_rate']:.1f}% of decoding steps "
                   f"({100 * tr.summary['dleaf_firing_rate_first_3_steps']:.1f}% of the first three); at object steps "
                   f"its precision for hallucinated objects is {100 * d['precision']:.1f}% against "
                   f"{100 * d['random_precision']:.1f}% for a random trigger with the same per-caption rate "
                   f"(difference {_ci(100 * d['precision_minus_random'], 100 * d['precision_minus_random_low'], 100 * d['precision_minus_random_high'], True)} points; "
                   f"{d['n_hallucinated']} hallucinated of {d['n_object_steps']} object steps)")
            a = _get(tr.tables["auroc_summary"], detector="dleaf (margin over threshold)")
            if a is not None:
                txt += (f", and the AUROC of its statistic for hallucinated against grounded object steps is "
                        f"{_ci(a['auroc'], a['ci_low'], a['ci_high'], digits=3)} (0.5 = chance)")
            out.append(txt + ".")
    orc = studies.get("oracle")
    if hasattr(orc, "tables"):
        t = orc.tables["oracle_summary"]
        hs, gs = _get(t, steps="hallucinated", layer_set="candidates"), _get(t, steps="grounded", layer_set="candidates")
        p = orc.tables["prediction_summary"]
        meas = _get(p, quantity="measured dCHAIR_i (D-LEAF vs greedy)")
        if hs is not None and gs is not None:
            txt = (f"Applied with perfect timing in its candidate layers, D-LEAF's fusion turns {hs['fix_rate']:.1f}% of "
                   f"{int(hs['n_steps'])} hallucinated steps into a present object and {hs['swap_rate']:.1f}% into another "
                   f"absent one, and makes {gs['harm_rate']:.1f}% of {int(gs['n_steps'])} grounded steps hallucinate; "
                   f"the first-order prediction of its CHAIR_i change from its actual firings is "
                   f"{orc.summary['predicted_dCHAIR_i']:+.2f} points")
            if meas is not None:
                txt += f", measured {_ci(meas['value'], meas['ci_low'], meas['ci_high'], True, 2)}"
            out.append(txt + ".")
    loc = studies.get("localization")
    if hasattr(loc, "summary") and loc.summary.get("verdict"):
        out.append("Localisation: " + loc.summary["verdict"][0])
    lev = studies.get("leverage")
    if hasattr(lev, "tables"):
        t = lev.tables["leverage_summary"]
        strong = t[t["drecall"] <= -10]
        worst = t.sort_values("drecall").iloc[0]
        where = ", ".join(f"layer {int(r.layer)}: {r.drecall:+.1f}" for r in strong.itertuples()) or (
            f"the largest cost is layer {int(worst.layer)}'s, {_ci(worst.drecall, worst.drecall_low, worst.drecall_high, True)}")
        out.append(f"The leverage map finds {len(strong)} of {len(t)} layers where an all-head fault costs at least 10 "
                   f"recall points ({where}; n = {int(t['n_images'].iloc[0])} images).")
    if pope_firing is not None and len(pope_firing):
        r = _get(pope_firing, pool="test")
        d = _get(pope, pool="test", method="dleaf-vqa", variant="adversarial", metric="accuracy")
        if r is not None and d is not None:
            out.append(f"On POPE (test, adversarial), D-LEAF with prompt-row seeding fires on {r['firing_rate']:.1f}% of "
                       f"questions and changes accuracy by {_ci(d['paired_diff'], d['paired_ci_low'], d['paired_ci_high'], True)} points "
                       f"(n = {int(d['n'])} questions).")
    return out


def _methods_section(chair: pd.DataFrame, comparisons: pd.DataFrame, pope: pd.DataFrame, verdicts: dict,
                     label: str = "method") -> list[str]:
    lines = []
    for pool in POOLS:
        c = chair[chair["pool"] == pool]
        if not len(c):
            continue
        rows = []
        for name in dict.fromkeys(c[label]):
            r = {label: name}
            for m in ("CHAIR_s", "CHAIR_i", "recall", "length"):
                s = _get(c, **{label: name, "metric": m})
                r[m] = _ci(s["value"], s["ci_low"], s["ci_high"])
                if name not in ("greedy", "greedy (none)"):
                    r[m] += " (d " + _bold_if(_ci(s["paired_diff"], s["paired_ci_low"], s["paired_ci_high"], True),
                                               s["paired_ci_low"], s["paired_ci_high"]) + ")"
            v = _get(comparisons, pool=pool, section="validity", **{label: name})
            r["degenerate %"] = f"{v['method_value']:.1f}" if v is not None else (
                f"{_get(comparisons, pool=pool, section='validity')['greedy_value']:.1f}" if len(comparisons) else "")
            for sec, met, col in (("valid", "CHAIR_i", "CHAIR_i d, valid captions"),
                                  ("truncation", "objects_CHAIR_i", "object-list CHAIR_i d vs truncated greedy")):
                s = _get(comparisons, pool=pool, section=sec, metric=met, **{label: name})
                r[col] = _bold_if(_ci(s["diff"], s["ci_low"], s["ci_high"], True, 2), s["ci_low"], s["ci_high"]) \
                    if s is not None else ""
            rows.append(r)
        n = int(c["n"].iloc[0])
        lines += [f"#### {pool} ({n} images)", "", md_table(pd.DataFrame(rows)), ""]
        lines += [f"- `{name}`: {verdicts[(pool, name)]}" for name in dict.fromkeys(c[label]) if (pool, name) in verdicts]
        lines.append("")
    return lines


def _pope_section(pope: pd.DataFrame) -> list[str]:
    lines = []
    for pool in POOLS:
        p = pope[(pope["pool"] == pool) & (pope["metric"].isin(["accuracy", "f1", "yes_ratio"]))]
        if not len(p):
            continue
        rows = []
        for (variant, name), g in p.groupby(["variant", "method"], sort=False):
            r = {"variant": variant, "method": name}
            for s in g.itertuples():
                r[s.metric] = _ci(s.value, s.ci_low, s.ci_high) + ("" if name == "greedy" else " (d " + _bold_if(
                    _ci(s.paired_diff, s.paired_ci_low, s.paired_ci_high, True), s.paired_ci_low, s.paired_ci_high) + ")")
            rows.append(r)
        lines += [f"#### POPE, {pool} ({int(p['n'].max())} questions per variant)", "", md_table(pd.DataFrame(rows)), ""]
    return lines


def tuning_record(tuned_file=None, weights_hash: str | None = None) -> tuple[dict, pd.DataFrame] | None:
    """The tuning run behind the settings: ``(chosen.json, confirmation table)`` from ``tuned_file``'s
    folder (default: the shipped ``data/tuned_methods.json`` with ``data/tuning/``), or ``None`` (also
    when it was tuned for other weights than ``weights_hash``)."""
    from dleaf_analysis.settings import TUNED_FILE, read_tuned

    f = Path(tuned_file) if tuned_file is not None else TUNED_FILE
    if not f.is_file():
        return None
    d = read_tuned(f)
    if "n_configurations_tried" not in d:  # a hand-written settings file: no tuning run behind it
        return None
    if weights_hash is not None and d.get("weights_hash") != weights_hash:  # not these weights' settings
        return None
    conf = next((c for c in (f.parent / "confirmation.csv", f.parent / "tuning" / "confirmation.csv") if c.is_file()),
                None)
    try:
        table = pd.read_csv(conf) if conf is not None else pd.DataFrame()
    except pd.errors.EmptyDataError:  # no confirmation images: an empty table
        table = pd.DataFrame()
    return d, table


def _tuning_section(rec: tuple[dict, pd.DataFrame] | None) -> list[str]:
    if rec is None:
        return []
    d, conf = rec
    rows = []
    for m, tried in d["n_configurations_tried"].items():
        r = {"method": m, "configurations tried": tried,
             "selected on tuning images": json.dumps(d["selected_on_tuning_images"].get(m, {}), sort_keys=True)}
        c = conf[conf["method"] == m] if len(conf) else conf
        if len(c):
            c = c.iloc[0]
            r["CHAIR_i d on confirmation"] = _bold_if(_ci(c["dCHAIR_i"], c["dCHAIR_i_low"], c["dCHAIR_i_high"], True, 2),
                                                      c["dCHAIR_i_low"], c["dCHAIR_i_high"])
            r["recall d"] = f"{c['drecall']:+.1f}"
        r["confirmed"] = {True: "yes", False: "no"}.get(d["confirmed"].get(m), "n/a")
        r["shipped"] = json.dumps(d["chosen"].get(m, {}), sort_keys=True) if d["chosen"].get(m) else "defaults"
        rows.append(r)
    return ["### Tuning behind these settings", "", d["rule"] + ".", "", md_table(pd.DataFrame(rows)), ""]


def tuning_finding(rec: tuple[dict, pd.DataFrame] | None) -> str | None:
    """One sentence: how many settings were tried, and which choices held on the confirmation images."""
    if rec is None:
        return None
    d, conf = rec
    total = sum(d["n_configurations_tried"].values())
    held = [m for m, ok in d["confirmed"].items() if ok]
    txt = (f"Tuning tried {total} configurations ({', '.join(f'{n} for {m}' for m, n in d['n_configurations_tried'].items())}) "
           f"on {d['tuning_images']} tuning images")
    if d.get("confirmation_images"):
        c = conf.set_index("method") if len(conf) else None
        parts = []
        for m in d["n_configurations_tried"]:
            if c is not None and m in c.index:
                parts.append(f"{m} {_ci(c.loc[m, 'dCHAIR_i'], c.loc[m, 'dCHAIR_i_low'], c.loc[m, 'dCHAIR_i_high'], True, 2)}")
        txt += (f"; on {d['confirmation_images']} confirmation images the choices changed CHAIR_i against greedy by "
                + "; ".join(parts) + f", so {', '.join(held) if held else 'none'} "
                f"{'ships its tuned settings' if len(held) == 1 else 'ship tuned settings'}"
                + (" and the rest run at their defaults" if held and len(held) < len(d["confirmed"]) else
                   (" (every method runs at its defaults)" if not held else "")))
    return txt + "."


def _studies_section(studies: dict) -> list[str]:
    from dleaf_analysis.studies import get_study

    lines = ["## Studies", ""]
    for name, r in studies.items():
        if isinstance(r, str):
            lines += [f"### {name}", "", f"Not run: {r}", ""]
            continue
        lines += [get_study(name).report(r.tables, r.summary), ""]
    return lines


def _figures_section(out: Path, quick: bool, seed: int, log, lm, figures_dir: Path | None, source=None,
                     tuned_file=None) -> list[str]:
    from dleaf_analysis.figures import FigureContext, render_all

    fdir = figures_dir or out / "figures"
    log(f"figures -> {fdir}")
    entries = render_all(FigureContext(results=out, lm=lm, n_images=8 if quick else 100, seed=seed, source=source,
                                       tuned_file=tuned_file), fdir, log=log)
    root = REPO_ROOT.resolve()
    rel = lambda p: p.resolve().relative_to(root) if p.resolve().is_relative_to(root) else p  # noqa: E731
    lines = ["## Figures", ""]
    for e in [e for e in entries if not e.get("skipped")]:
        paper = f" ({e['paper']} of the paper)" if e["paper"] else ""
        lines.append(f"- [{e['figure']}]({rel(fdir / (e['figure'] + '.png'))}){paper}: {e['title']}")
    skipped = [e for e in entries if e.get("skipped")]
    return lines + [""] + (["Skipped: " + "; ".join(f"{e['figure']} ({e['skipped']})" for e in skipped)] if skipped
                           else [])


# -- the main job ----------------------------------------------------------------------------------------
def reproduce(
    out: str | Path = "results",
    lm=None,
    source=None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    update_readme: bool = False,
    figures_dir: Path | None = None,
    tuned_file=None,
    tuned_any: bool = False,
    tune_fraction: float = 0.25,
    shard=None,
    batch_size: int | None = None,
    study_limit: int | None = None,
    pool_limit: int | None = None,
    pope_limit: int = 500,
) -> pd.DataFrame:
    """Run the main job (see the module doc); write ``out/report.md`` (always, also when a stage
    finds nothing to do) and return the summary table.  ``quick``: a smoke-size run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lm = lm or load_model()
    pool, study_src, tuned_file = pools(lm, source, quick, tuned_file, tune_fraction, shard, out, log, seed, progress,
                                        pool_limit)
    methods = method_configs(lm, tuned_file, tuned_any)
    chair_frames, comp_frames, pope_frames, firing, verdicts = [], [], [], [], {}
    for name, src in pool.items():
        s, res = compare_methods("chair", name, src, lm, methods, out, seed, progress, log)
        chair_frames.append(s)
        c, v = comparison_rows(name, res, seed)
        comp_frames.append(c)
        verdicts.update({(name, k): x for k, x in v.items()})
        if src.record().get("kind") == "scene":
            psrc = src.limit(4 if quick else pope_limit)
            pm = {**methods, "dleaf-vqa": {**methods["dleaf"], "running_seed": "prefill-rows"}}
            p, pres = compare_methods("pope", name, psrc, lm, pm, out, seed, progress, log)
            pope_frames.append(p)
            inter = pres["dleaf-vqa"].interventions
            n_q = len(pres["dleaf-vqa"].details)
            fired = (len(inter.loc[inter["step"] == 0, ["variant", "item"]].drop_duplicates())
                     if inter is not None and len(inter) else 0)  # questions (item = position in its variant)
            firing.append({"pool": name, "n_questions": n_q, "n_fired": int(fired),
                           "firing_rate": 100 * fired / n_q if n_q else float("nan")})
    chair = pd.concat(chair_frames, ignore_index=True)
    comparisons = pd.concat(comp_frames, ignore_index=True)
    pope = pd.concat(pope_frames, ignore_index=True) if pope_frames else pd.DataFrame()
    pope_firing = pd.DataFrame(firing)
    if distributed.writer():
        chair.to_csv(out / "methods_chair.csv", index=False)
        comparisons.to_csv(out / "comparisons.csv", index=False)
        pope.to_csv(out / "methods_pope.csv", index=False)
        pope_firing.to_csv(out / "pope_firing.csv", index=False)
        (out / "verdicts.json").write_text(json.dumps({f"{p}:{m}": v for (p, m), v in verdicts.items()}, indent=1))

    # D-LEAF's components under the same comparison
    log("component ablation of D-LEAF")
    comps = component_configs(lm, study_src, tuned_file, tuned_any)
    comp_chair, comp_cmp, comp_verdicts = [], [], {}
    for name, src in pool.items():
        res = {"greedy": evaluate("chair", src, lm, seed=seed, progress=False, out_dir=out / "evals" /
                                  f"chair-{name}-greedy")}
        for label, cfg in comps.items():
            res[label] = evaluate("chair", src, lm, method="dleaf", method_config=cfg, seed=seed, progress=progress,
                                  out_dir=out / "evals" / f"components-{name}-{label.split()[0].lower()}")
        rows = []
        for label, r in res.items():
            s = r.summary.assign(component="greedy (none)" if label == "greedy" else label, pool=name)
            if label == "greedy":
                s = s.assign(paired_diff=0.0, paired_ci_low=0.0, paired_ci_high=0.0)
            else:
                d = chair_paired(res["greedy"].details, r.details, seed=seed).set_index("metric")
                s = s.assign(paired_diff=list(d.loc[s.metric, "diff"]), paired_ci_low=list(d.loc[s.metric, "ci_low"]),
                             paired_ci_high=list(d.loc[s.metric, "ci_high"]))
            rows.append(s)
        comp_chair.append(pd.concat(rows, ignore_index=True))
        c, v = comparison_rows(name, res, seed, label="component")
        comp_cmp.append(c)
        comp_verdicts.update({(name, k): x for k, x in v.items()})
    components = pd.concat(comp_chair, ignore_index=True)
    comp_comparisons = pd.concat(comp_cmp, ignore_index=True)
    if distributed.writer():
        components.to_csv(out / "components.csv", index=False)
        comp_comparisons.to_csv(out / "components_comparisons.csv", index=False)

    if not (out / "tuning" / "sensitivity.csv").is_file():  # the scene world (a real source was tuned above)
        from dleaf_analysis.evaluation.tuning import sensitivity_curves

        n_sens = 4 if quick else (study_limit or 100)
        log(f"D-LEAF sensitivity curves on the first {n_sens} study images")
        sensitivity_curves(out / "tuning", lm, study_src.limit(n_sens), methods.get("dleaf"), seed=seed,
                           progress=progress, batch_size=batch_size or 32)
    studies = run_studies(lm, study_src, out, quick, seed, progress, log, tuned_file, tuned_any, study_limit,
                          batch_size)
    summary = chair[chair["metric"].isin(["CHAIR_s", "CHAIR_i", "recall"])][
        ["pool", "method", "metric", "value", "ci_low", "ci_high", "paired_diff"]].reset_index(drop=True)
    if not distributed.writer():  # under a multi-rank launch rank 0 writes the report and draws the figures
        return summary
    tuning = tuning_record(tuned_file, lm.weights_hash)
    prose = findings(comparisons, verdicts, pope, studies, pope_firing)
    where = "the embedded model on the scene world" if source is None else f"{lm.model_id} on {source.kind} images"
    methods_txt = ", ".join(f"`{m}` {json.dumps(c, sort_keys=True)}" for m, c in methods.items() if m != "greedy")
    if not any(methods.values()) and (tuned_file is not None or tuning is not None):
        settings_txt = (f"every method at its defaults (`{tuned_file or 'data/tuned_methods.json'}` ships no confirmed "
                        "choice)")
    elif not any(methods.values()):
        settings_txt = ("every method at its defaults (no tuned settings for these weights: `dleaf tune` has not been "
                        "run for this model)")
    elif tuned_file is None:
        settings_txt = (f"{methods_txt} (`data/tuned_methods.json`: chosen on dev, shipped only if confirmed on the "
                        "`confirm` split)")
    else:
        settings_txt = f"{methods_txt} (from `{tuned_file}`)"
    sizes = {k: len(v) for k, v in pool.items()}
    flags = (" --quick" if quick else "") + (f" --limit {pool_limit}" if pool_limit else "") + \
        (f" --study-limit {study_limit}" if study_limit else "") + (f" --pope-limit {pope_limit}" if pope_limit != 500
                                                                    and not quick else "")
    body = ["## Findings", "", *[f"- {p}" for p in prose], "",
            f"## Methods on {where}", "",
            "CHAIR values in percent (length in words) with bootstrap 95% CIs; `d` is the paired difference from greedy "
            "on the same images (points, paired bootstrap, bold where the CI excludes 0); `degenerate %`: outputs that "
            "are not descriptions (a bare yes/no, no object, or fewer than five words); `valid captions`: the images "
            "where both captions are real descriptions; `truncated greedy`: greedy's object list cut per image to the "
            "method's object count (object-list CHAIR_i, each object counted once).  A method reduces hallucination only "
            "where it beats truncated greedy on valid captions.", "",
            f"Settings: {settings_txt}.", "", *_tuning_section(tuning)]
    body += _methods_section(chair, comparisons, pope, verdicts)
    if len(pope):
        body += ["### POPE", "",
                 "`dleaf-vqa`: D-LEAF with its running statistics seeded from the prompt's rows, so that it can act on "
                 "step 0 of a one-token answer (with the default seeding no layer can fire there); it fired on "
                 + ", ".join(f"{r.firing_rate:.1f}% of the {r.pool} questions" for r in pope_firing.itertuples()) + ".",
                 ""] + _pope_section(pope)
    body += ["### D-LEAF component ablation", "",
             f"LIAE picks layers, IAF picks heads; `static layers` = {comps['static layers']['layers']} (highest mean "
             "LIAE on the study images' captions).", ""]
    body += _methods_section(components, comp_comparisons, pd.DataFrame(), comp_verdicts, label="component")
    body += _studies_section(studies)
    body += _figures_section(out, quick, seed, log, lm, figures_dir, source=next(iter(pool.values())) if source
                             is not None else None, tuned_file=tuned_file)
    manifest = json.loads((out / "evals" / f"chair-test-greedy" / "protocol.json").read_text())
    header = [f"# dleaf-analysis report: {where}{' (quick)' if quick else ''}", "",
              f"Generated by `dleaf reproduce{flags}` in {time.time() - t0:.0f} s on "
              + ", ".join(f"{n} {k} images" for k, n in sizes.items()) + "; model "
              f"`{manifest['model']['id']}` weights `{manifest['model']['weights_hash']}`, prompt "
              f"`{manifest['config']['prompt']}`, max {manifest['config']['max_new_tokens']} new tokens, seed {seed}.", ""]
    (out / "report.md").write_text("\n".join(header + body) + "\n")
    (out / "findings.md").write_text("\n".join(f"- {p}" for p in prose) + "\n")
    if update_readme and not quick:
        (REPO_ROOT / "RESULTS.md").write_text("\n".join(header + body).replace("](figures/", "](figures/") + "\n")
        splice_readme(f"Run: `dleaf reproduce{flags}` on " + ", ".join(f"{n} {k} images" for k, n in sizes.items())
                      + f" (POPE on the first {pope_limit} of each; studies on the first {study_limit or 300} dev images); "
                      f"settings: {settings_txt}. {tuning_finding(tuning) or ''}\n\n"
                      + "\n".join(f"- {p}" for p in prose), "findings")
    return summary


def splice_readme(text: str, key: str, readme: Path = REPO_ROOT / "README.md") -> None:
    """Replace the README's generated section ``key`` (between its two markers)."""
    start, end = _markers(key)
    s = readme.read_text()
    pattern = re.escape(start) + ".*?" + re.escape(end)
    if not re.search(pattern, s, flags=re.S):
        raise RuntimeError(f"README has no markers for section {key!r} ({start} ... {end})")
    s = re.sub(pattern, lambda _: f"{start}\n{text}\n{end}", s, flags=re.S)
    readme.write_text(s)
