"""The tuning study: the same budget of configurations per method on the tuning images (the scene
world's dev split, 1,000 images; or held-out images of a real checkpoint), one selection rule for
all, the choice **confirmed on separate images** before it ships, and sensitivity curves for
D-LEAF.

Selection rule (the same for every method): the lowest CHAIR_i among configurations whose recall
is at most ``max_recall_drop`` points below greedy's and whose share of degenerate outputs
(:mod:`dleaf_analysis.evaluation.validity`) is at most one point above greedy's, on the tuning
images; the method's default if none.  The choice is then run on the confirmation images (the
``confirm`` split): it is **confirmed** if it lowers CHAIR_i against greedy there (paired 95% CI
below 0) within the same recall and validity limits.  An unconfirmed choice is not shipped: the
method ships at its default settings, and ``chosen.json`` says so.  The number of configurations
tried is recorded next to every choice (the more tried, the larger the winner's curse).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd

from dleaf_analysis import distributed, runs
from dleaf_analysis.evaluation.chair import chair_paired
from dleaf_analysis.evaluation.runner import evaluate
from dleaf_analysis.evaluation.validity import with_validity
from dleaf_analysis.models.loading import LoadedModel, load_model
from dleaf_analysis.runs import TuneConfig
from dleaf_analysis.sources import ImageSource, SourceError, as_source
from dleaf_analysis.sweeps import open_store, run_sweep

BUDGET = 8  # configurations per method


def grids_for(n_layers: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """The tuning grid (``BUDGET`` configurations per method) and D-LEAF's sensitivity curves, with
    layer lists fitted to a model of ``n_layers`` (the upper half of the candidate layers)."""
    lo = min(2, n_layers - 1)
    upper = list(range(max(lo, (lo + n_layers) // 2), n_layers))
    every = list(range(n_layers))
    dleaf = [
        {"gamma": 0.5, "threshold": "running", "k": 0.5},
        {"gamma": 1.0, "threshold": "running", "k": 0.5},
        {"gamma": 0.5, "threshold": "running", "k": 1.0, "warmup": 5},
        {"gamma": 1.0, "threshold": "running", "k": 1.0, "warmup": 5},
        {"gamma": 1.0, "threshold": "running", "target_rate": 0.1, "warmup": 5},
        {"gamma": 0.5, "threshold": "running", "k": 1.0, "warmup": 5, "layers": every},
        {"gamma": 0.5, "threshold": "bas", "delta": 0.05},
        {"gamma": 1.0, "threshold": "running", "k": 1.0, "warmup": 5, "fusion": "image"},
    ]
    grids = {
        "dleaf": dleaf,
        "uniform": [{"gamma": g, "fusion": f} for g in (0.25, 0.5, 1.0) for f in ("row", "image")]
        + [{"gamma": 0.5, "fusion": "image", "head_selection": "below-rho"},
           {"gamma": 0.25, "fusion": "image", "layers": upper}],
        "pai": [{"alpha": a, "layers": ls} for a in (0.25, 0.5, 1.0, 2.0) for ls in (None, upper)],
        "vcd": [{"alpha": a, "beta": b} for a in (0.5, 1.0, 2.0) for b in (0.1, 0.2)]
        + [{"alpha": 1.0, "beta": 0.1, "noise_steps": 999}, {"alpha": 0.5, "beta": 0.1, "noise_steps": 999}],
    }
    assert all(len(g) == BUDGET for g in grids.values())
    sensitivity = {
        "gamma": [{"gamma": g} for g in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "k": [{"k": k, "target_rate": None} for k in (0.0, 0.5, 1.0, 2.0)],
        "warmup": [{"warmup": w} for w in (0, 5, 10)],
    }
    return grids, sensitivity


def sensitivity_curves(out_dir, lm, source: ImageSource, base: dict | None = None, seed: int = 0,
                       progress: bool = True, batch_size: int = 32) -> pd.DataFrame:
    """D-LEAF's sensitivity curves: one parameter at a time (``gamma``, ``k``, ``warmup``) varied
    around ``base`` (default: D-LEAF's defaults) on ``source``; resumable in ``out_dir/sensitivity``,
    written to ``out_dir/sensitivity.csv``.  One row per configuration (CHAIR, recall, degenerate %)."""
    from dleaf_analysis.interventions import get_method
    from dleaf_analysis.models.adapters import ModelAdapter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, curves = grids_for(ModelAdapter(lm.model).n_layers)
    base = dict(base or {})
    scfg = TuneConfig(seed=seed, grid={"base": base, "curves": curves})
    sstore = open_store(out / "sensitivity", runs.manifest(scfg, lm.record(), source.record()))
    base_cfg = {k: v for k, v in get_method("dleaf", base).to_dict().items() if k != "method"}
    sunits = [(f"{p}:{json.dumps(v)}", (p, {**base_cfg, **v})) for p, vs in curves.items() for v in vs]

    def run_sens(unit):
        param, c = unit
        res = evaluate("chair", source, lm, method="dleaf", method_config=c, seed=seed, n_resamples=200,
                       progress=False, batch_size=batch_size)
        return [{**_row("dleaf", c, res), "parameter": param, "param_value": json.dumps(c[param])}]

    sens = run_sweep(sunits, run_sens, sstore, progress=progress, desc=f"sensitivity on {len(source)} images")
    if distributed.writer():
        sens.to_csv(out / "sensitivity.csv", index=False)
    return sens


def _key(method: str, cfg: dict) -> str:
    return f"{method}:{json.dumps(cfg, sort_keys=True)}"


def _row(method: str, cfg: dict, res) -> dict:
    s = res.summary.set_index("metric")["value"].to_dict()
    deg = with_validity(res.details)["degenerate"].notna().mean()
    return {"method": method, "config": json.dumps(cfg, sort_keys=True), **s, "degenerate": 100 * float(deg),
            "n_images": len(res.details)}


def confirmation_source(data: ImageSource, confirm: ImageSource | str | None = None) -> ImageSource | None:
    """The images a choice made on ``data`` is confirmed on: ``confirm`` if given; for the scene
    world, its ``confirm`` split (whatever the tuning source); for a real source without held-out
    confirmation images, ``None`` (its choice is then used unconfirmed, and ``chosen.json`` says
    ``confirmation_images: 0``)."""
    if confirm is not None:
        return as_source(confirm)
    if data.record().get("kind") == "scene":
        return as_source("confirm")
    return None


def tune(
    out_dir: str | Path,
    lm: LoadedModel | None = None,
    limit: int | None = None,
    methods: tuple[str, ...] = ("dleaf", "uniform", "pai", "vcd"),
    max_recall_drop: float = 3.0,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    source: ImageSource | str | None = None,
    confirm: ImageSource | str | None = None,
    exclude: ImageSource | None = None,
    sensitivity_limit: int | None = 300,
    batch_size: int = 32,
) -> dict:
    """Run the grid on ``source`` (default: the dev split) -- resumable --, confirm each method's
    choice on ``confirm`` (default: the ``confirm`` split; for a real checkpoint, give held-out
    images disjoint from both), then D-LEAF's sensitivity curves around its shipped choice (on the
    first ``sensitivity_limit`` tuning images).

    ``exclude``: the evaluation images; tuning refuses to run if ``source`` or ``confirm`` shares any.
    Returns ``{"chosen", "grid", "confirmation", "sensitivity", "summary"}`` and writes ``grid.csv``,
    ``confirmation.csv``, ``sensitivity.csv``, ``chosen.json`` and ``tuned_methods.json`` (the
    settings every command reads with ``--tuned``, keyed by the model's weights hash) to ``out_dir``.
    """
    from dleaf_analysis.models.adapters import ModelAdapter

    lm = lm or load_model()
    out = Path(out_dir)
    data = as_source("dev" if source is None else source, limit)
    conf = confirmation_source(data, confirm)
    data.check_model(lm)
    keys = {data.key(i) for i in range(len(data))}
    for other, what in ((exclude, "evaluation"), (conf, "confirmation")):
        if other is not None and other is not data:
            shared = keys & {other.key(i) for i in range(len(other))}
            if shared:
                raise SourceError(f"{len(shared)} tuning images are also {what} images (e.g. {sorted(shared)[:3]}): "
                                  f"tune on images disjoint from the {what} images")
    grids, _ = grids_for(ModelAdapter(lm.model).n_layers)
    cfg = TuneConfig(seed=seed, max_recall_drop=max_recall_drop, grid={m: grids[m] for m in methods})
    store = open_store(out / "grid", runs.manifest(cfg, lm.record(), data.record()))

    def run_one(unit, on=data):
        method, c = unit
        res = evaluate("chair", on, lm, method=method, method_config=c, seed=seed, n_resamples=200, progress=False,
                       batch_size=batch_size)
        return [_row(method, c, res)]

    units = [(_key("greedy", {}), ("greedy", {}))] + [(_key(m, c), (m, c)) for m in methods for c in grids[m]]
    grid = run_sweep(units, run_one, store, progress=progress, desc=f"tuning on {len(data)} images")
    greedy = grid[grid.method == "greedy"].iloc[0]
    chosen: dict[str, dict] = {}
    for m in methods:
        g = grid[(grid.method == m) & (grid.recall >= greedy.recall - max_recall_drop)
                 & (grid.degenerate <= greedy.degenerate + 1.0)]
        chosen[m] = json.loads(g.sort_values(["CHAIR_i", "CHAIR_s"]).iloc[0]["config"]) if len(g) else {}
    if distributed.writer():
        grid.to_csv(out / "grid.csv", index=False)

    # confirmation on separate images: paired against greedy on the same images
    confirmed: dict[str, dict] = {}
    conf_rows = []
    if conf is not None:
        cstore = open_store(out / "confirmation", runs.manifest(cfg, lm.record(), conf.record()))
        base_res: dict = {}

        def run_conf(unit):
            method, c = unit
            res = evaluate("chair", conf, lm, method=method, method_config=c, seed=seed, n_resamples=200,
                           progress=False, batch_size=batch_size)
            return [{**_row(method, c, res), "details": res.details.to_dict(orient="records")}]

        cunits = [(_key("greedy", {}), ("greedy", {}))] + [(_key(m, chosen[m]), (m, chosen[m])) for m in methods]
        cframe = run_sweep(cunits, run_conf, cstore, progress=progress, desc=f"confirming on {len(conf)} images")
        recs = {(r["method"], r["config"]): r for r in cframe.to_dict(orient="records")}
        base_res = recs[("greedy", json.dumps({}, sort_keys=True))]
        gdet = pd.DataFrame(base_res["details"])
        for m in methods:
            r = recs[(m, json.dumps(chosen[m], sort_keys=True))]
            d = chair_paired(gdet, pd.DataFrame(r["details"]), n_resamples=1000, seed=seed).set_index("metric")
            ok = bool(d.loc["CHAIR_i", "ci_high"] < 0 and r["recall"] >= base_res["recall"] - max_recall_drop
                      and r["degenerate"] <= base_res["degenerate"] + 1.0)
            conf_rows.append({"method": m, "config": json.dumps(chosen[m], sort_keys=True),
                              "dCHAIR_i": d.loc["CHAIR_i", "diff"], "dCHAIR_i_low": d.loc["CHAIR_i", "ci_low"],
                              "dCHAIR_i_high": d.loc["CHAIR_i", "ci_high"], "drecall": d.loc["recall", "diff"],
                              "degenerate": r["degenerate"], "greedy_degenerate": base_res["degenerate"],
                              "confirmed": ok, "n_images": len(conf)})
            confirmed[m] = chosen[m] if ok else {}
    else:
        confirmed = dict(chosen)
    confirmation = pd.DataFrame(conf_rows)
    if distributed.writer():
        confirmation.to_csv(out / "confirmation.csv", index=False)
    shipped = {m: confirmed.get(m, {}) for m in methods}

    # sensitivity of D-LEAF around its shipped config (defaults where the choice was not confirmed)
    sens = (sensitivity_curves(out, lm, data.limit(sensitivity_limit), shipped["dleaf"], seed=seed,
                               progress=progress, batch_size=batch_size) if "dleaf" in methods else pd.DataFrame())
    result = {
        "chosen": shipped,
        "selected_on_tuning_images": chosen,
        "confirmed": {m: bool(confirmation.set_index("method").loc[m, "confirmed"]) if len(confirmation) else None
                      for m in methods},
        "n_configurations_tried": {m: len(grids[m]) for m in methods},
        "rule": (f"lowest CHAIR_i with recall >= greedy - {max_recall_drop} and degenerate outputs <= greedy + 1 point "
                 f"on {len(data)} tuning images; shipped only if it lowers CHAIR_i against greedy on "
                 f"{len(conf) if conf is not None else 0} confirmation images (paired 95% CI below 0), else the "
                 "method's defaults"),
        "greedy_tuning": greedy[["CHAIR_s", "CHAIR_i", "recall", "degenerate"]].to_dict(),
        "tuning_images": len(data), "confirmation_images": len(conf) if conf is not None else 0,
        "weights_hash": lm.weights_hash,
    }
    if distributed.writer():
        (out / "chosen.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "tuned_methods.json").write_text(json.dumps(result, indent=1, default=str))
    distributed.barrier()
    log(f"selected: {json.dumps(chosen)}; shipped (confirmed): {json.dumps(shipped)}")
    return {"chosen": shipped, "grid": grid, "confirmation": confirmation, "sensitivity": sens, "summary": result}
