"""Tuning study on the dev split: the same budget of configurations per method, one selection
rule for all, sensitivity curves for D-LEAF's gamma and threshold k; then one evaluation of the
chosen settings on the test split.

Selection rule (the same for every method): the lowest CHAIR_i among configurations whose recall
is at most ``max_recall_drop`` points below greedy's on the same images; greedy if none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd

from dleaf_analysis.evaluation.runner import evaluate
from dleaf_analysis.models.loading import LoadedModel, load_model
from dleaf_analysis.scenes import load_split
from dleaf_analysis.sources import ImageSource, SourceError
from dleaf_analysis.sweeps import ResultStore, run_sweep


# the same number of configurations (12) per method.  Settings a grid does not vary are written
# into every one of its configurations, so that every default of a tuned method is in its grid
# (a test checks it) and the chosen configuration is complete.
GRIDS: dict[str, list[dict]] = {
    "dleaf": [
        {"gamma": g, "fusion": fu, "threshold": t, "k": k, "delta": 0.05, "head_selection": "below-mean",
         "running_seed": "prefill-last"}
        for g in (0.5, 1.0)
        for fu in ("row", "image")
        for t, k in (("running", 0.5), ("running", 1.0), ("bas", 1.0))
    ],
    "uniform": [
        {"gamma": g, "fusion": fu, "head_selection": hs}
        for g in (0.25, 0.5, 1.0)
        for fu in ("row", "image")
        for hs in ("below-mean", "below-rho")
    ],
    "pai": [
        {"alpha": a, "layers": ls}
        for a in (0.25, 0.5, 1.0, 2.0)
        for ls in (None, [2, 3], [4, 5])
    ],
    "vcd": [
        {"alpha": a, "beta": b, "noise_steps": n}
        for a in (0.5, 1.0, 2.0)
        for b in (0.1, 0.2)
        for n in (500, 999)
    ],
}
SENSITIVITY: dict[str, list[dict]] = {
    "gamma": [{"gamma": g} for g in (0.0, 0.25, 0.5, 0.75, 1.0)],
    "k": [{"k": k} for k in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)],
    "head_selection": [{"head_selection": h} for h in ("below-mean", "below-rho", "bottom-k")],
    "fusion": [{"fusion": f} for f in ("row", "image")],
    "layers": [{"layers": ls} for ls in ([0, 1, 2, 3, 4, 5], [2, 3, 4, 5], [2, 3], [4, 5])],
}


def _layer_pairs(n_layers: int) -> tuple[list[int], list[int]]:
    """Two adjacent-layer pairs, in the lower and the upper half of the candidate layers 2..L-1
    (``[2, 3]`` and ``[4, 5]`` on the 6-layer embedded model)."""
    lo = min(2, n_layers - 1)
    mid = max(lo, (lo + n_layers) // 2)
    return (sorted({lo, min(lo + 1, n_layers - 1)}), sorted({mid, min(mid + 1, n_layers - 1)}))


def grids_for(n_layers: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """``GRIDS`` and ``SENSITIVITY`` with their layer lists fitted to a model of ``n_layers``
    (unchanged for the 6-layer embedded model)."""
    if n_layers == 6:
        return GRIDS, SENSITIVITY
    a, b = _layer_pairs(n_layers)
    grids = {**GRIDS, "pai": [{"alpha": c["alpha"], "layers": {None: None, "a": a, "b": b}[
        None if c["layers"] is None else ("a" if c["layers"] == [2, 3] else "b")]} for c in GRIDS["pai"]]}
    sens = {**SENSITIVITY, "layers": [{"layers": list(range(n_layers))},
                                      {"layers": list(range(min(2, n_layers - 1), n_layers))}, {"layers": a},
                                      {"layers": b}]}
    dedup = lambda cs: list({json.dumps(c, sort_keys=True): c for c in cs}.values())  # noqa: E731
    return {m: dedup(g) for m, g in grids.items()}, {p: dedup(v) for p, v in sens.items()}


def _key(method: str, cfg: dict) -> str:
    return f"{method}:{json.dumps(cfg, sort_keys=True)}"


def tune(
    out_dir: str | Path,
    lm: LoadedModel | None = None,
    limit: int | None = None,
    methods: tuple[str, ...] = tuple(GRIDS),
    max_recall_drop: float = 3.0,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    source: ImageSource | None = None,
    exclude: ImageSource | None = None,
) -> dict:
    """Run the grid on dev (or on ``source``: held-out images of a real model) -- resumable --
    then the sensitivity curves around D-LEAF's choice.

    ``exclude``: the evaluation images; tuning refuses to run if ``source`` shares any of them.
    Returns ``{"chosen": {method: config}, "grid": DataFrame, "sensitivity": DataFrame}`` and
    writes ``grid.csv``, ``sensitivity.csv``, ``chosen.json`` and ``tuned_methods.json`` (the
    settings file every command reads with ``--tuned``, keyed by the model's weights hash) in
    ``out_dir``.
    """
    from dleaf_analysis.models.adapters import ModelAdapter

    lm = lm or load_model()
    out = Path(out_dir)
    if source is None:
        from dleaf_analysis.sources import SceneSource

        SceneSource.load("dev", limit=1).check_model(lm)
        data: str | ImageSource = "dev"
        ident = {"split": "dev", "split_hash": load_split("dev", limit=limit).annotations_hash}
    else:
        data = source.limit(limit)
        data.check_model(lm)
        if exclude is not None:
            shared = {data.key(i) for i in range(len(data))} & {exclude.key(i) for i in range(len(exclude))}
            if shared:
                raise SourceError(f"{len(shared)} tuning images are also evaluation images (e.g. {sorted(shared)[:3]}): "
                                  "tune on a held-out image list disjoint from the evaluation list")
        ident = {"source": data.describe(), "images_hash": data.fingerprint}
    grids, sensitivity = grids_for(ModelAdapter(lm.model).n_layers)
    store = ResultStore(out / "grid", {"weights_hash": lm.weights_hash, **ident, "limit": limit, "seed": seed,
                                       "grids": {m: grids[m] for m in methods}})

    def run_one(unit):
        method, cfg = unit
        res = evaluate("chair", data, lm, method=method, method_config=cfg, limit=limit, seed=seed,
                       n_resamples=200, progress=False)
        s = res.summary.set_index("metric")["value"].to_dict()
        return [{"method": method, "config": json.dumps(cfg, sort_keys=True), **s}]

    units = [(_key("greedy", {}), ("greedy", {}))] + [(_key(m, c), (m, c)) for m in methods for c in grids[m]]
    grid = run_sweep(units, run_one, store, progress=progress, desc="tuning on " + ("dev" if source is None else
                                                                                   f"{len(data)} held-out images"))
    greedy = grid[grid.method == "greedy"].iloc[0]
    chosen: dict[str, dict] = {}
    for m in methods:
        g = grid[(grid.method == m) & (grid.recall >= greedy.recall - max_recall_drop)]
        chosen[m] = json.loads(g.sort_values(["CHAIR_i", "CHAIR_s"]).iloc[0]["config"]) if len(g) else {}
    grid.to_csv(out / "grid.csv", index=False)
    # sensitivity of D-LEAF around its chosen config
    frames = []
    if "dleaf" in methods:
        sstore = ResultStore(out / "sensitivity", {**store.manifest, "base": chosen["dleaf"], "curves": sensitivity})
        units = [(f"{p}:{json.dumps(v)}", (p, {**chosen["dleaf"], **v})) for p, vs in sensitivity.items() for v in vs]

        def run_sens(unit):
            param, cfg = unit
            rows = run_one(("dleaf", cfg))
            rows[0].update({"parameter": param, "param_value": json.dumps(cfg[param])})
            return rows

        frames.append(run_sweep(units, run_sens, sstore, progress=progress, desc="sensitivity"))
    sens = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    sens.to_csv(out / "sensitivity.csv", index=False)
    where = "dev" if source is None else "held-out images"
    result = {"chosen": chosen, "rule": f"lowest CHAIR_i with recall >= greedy - {max_recall_drop} ({where})",
              "greedy_dev": greedy[["CHAIR_s", "CHAIR_i", "recall"]].to_dict(), "limit": limit,
              "weights_hash": lm.weights_hash}
    if source is not None:
        result["tuning_images"] = [data.key(i) for i in range(len(data))]
    (out / "chosen.json").write_text(json.dumps(result, indent=1))
    (out / "tuned_methods.json").write_text(json.dumps(result, indent=1))
    log(f"chosen settings: {json.dumps(chosen)}")
    return {"chosen": chosen, "grid": grid, "sensitivity": sens, "summary": result}
