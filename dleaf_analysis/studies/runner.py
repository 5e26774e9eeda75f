"""``run_study``: the causal studies as resumable sweeps over hallucination events.

Studies: ``ablation`` (ablation and correction maps), ``patching`` (counterfactual patching and
attribution patching, with the attribution-vs-exact Spearman), ``localization`` (detectors vs
causal maps, with a plain verdict), ``dpo`` (Theorem 1 alignment against a random-fusion null).
Each writes ``out/<study>/results.jsonl`` as events finish, then tidy tables (``*.parquet``,
``summary.csv``) and ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from dleaf_analysis import diagnostics as D
from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT
from dleaf_analysis.models.loading import LoadedModel, load_model
from dleaf_analysis.scenes import Split
from dleaf_analysis.seeding import derive_seed
from dleaf_analysis.sources import ImageSource, SceneSource, SourceError
from dleaf_analysis.studies import causal, dpo, localization
from dleaf_analysis.studies.events import as_source, event_inputs, find_events
from dleaf_analysis.sweeps import ResultStore, check_shards, run_sweep
from dleaf_analysis.errors import DleafError

STUDIES = ("ablation", "patching", "localization", "dpo", "calibration")


class NoEventsError(DleafError, RuntimeError):
    """The model did not hallucinate on the chosen images (nothing to study)."""


@dataclass
class StudyResult:
    study: str
    events: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"study": self.study, "summary": self.summary,
                           **{k: v.to_dict(orient="records") for k, v in self.tables.items() if k.endswith("summary")}},
                          indent=1, default=float)


def _tidy_maps(key: str, maps: dict) -> list[dict]:
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


def load_source(source: ImageSource | Split | str, limit: int | None = None) -> ImageSource:
    """An image source from a scene split name, a :class:`Split`, or a source; first ``limit`` items."""
    if isinstance(source, str):
        from dleaf_analysis.scenes import SPLITS

        if source not in SPLITS:
            raise SourceError(f"unknown split {source!r}; choose one of {sorted(SPLITS)}, or give a COCO or JSONL source")
        return SceneSource.load(source, limit=limit)
    return as_source(source).limit(limit)


def run_study(
    study: str,
    source: ImageSource | Split | str = "dev",
    limit: int | None = 100,
    out: str | Path = "runs/studies",
    lm: LoadedModel | None = None,
    dleaf_config: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    faults: list | None = None,
    batch_size: int | None = None,
    event_token: str = "first",
    tuned_file: str | Path | None = None,
) -> StudyResult:
    """Run one study on the hallucination events of the first ``limit`` images of ``source`` (a
    scene split name, or an :class:`~dleaf_analysis.sources.ImageSource`, possibly a shard)
    (``calibration``: on those images, with ``faults``, default: the default fault grid).

    ``batch_size`` bounds the intervened copies per forward; ``event_token``: see
    :mod:`dleaf_analysis.studies.events`; ``tuned_file``: tuned settings to use (default: the
    shipped ones), applied only if they were tuned for this model's weights."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {STUDIES}")
    from dleaf_analysis.settings import tuned_config

    lm = lm or load_model()
    data = load_source(source, limit)
    data.check_model(lm)
    cfg = DLeaf(**{**tuned_config("dleaf", lm.weights_hash, tuned_file), **(dleaf_config or {})})
    out = Path(out) / study
    if study == "calibration":
        return _calibration(lm, data, cfg, out, seed, progress, log, faults, tuned_file)
    manifest = {"study": study, "weights_hash": lm.weights_hash, "model_id": lm.model_id, **_source_manifest(data),
                "limit": limit, "seed": seed, "dleaf": cfg.to_dict(), "event_token": event_token}
    store = ResultStore(out, manifest)
    events_file = out / "events.parquet"
    if events_file.is_file():
        events = pd.read_parquet(events_file)
    else:
        events = find_events(lm, data, progress=progress, event_token=event_token)
        events.to_parquet(events_file)
    hall = events[(events.kind == "hallucinated") & events.preferred.notna()].copy()
    hall["key"] = [f"{r.item}:{r.step}" for r in hall.itertuples()]
    n_total = int((events.kind == "hallucinated").sum())
    summary = {"n_images": len(data), "n_object_tokens": len(events), "n_hallucinated": n_total,
               "n_with_preferred": len(hall), "n_with_cue": int(hall.cue.notna().sum()),
               "n_cue_was_top_preferred": int(events.get("cue_was_top_preferred", pd.Series(dtype=bool)).fillna(False)
                                              .astype(bool).sum())}
    if study in ("patching", "dpo"):
        hall = hall[hall.cue.notna()]
    if len(hall) == 0:
        raise NoEventsError(
            f"no usable hallucination events on the {len(data)} images of {data!r} ({n_total} hallucinated "
            f"object mentions, {summary['n_with_preferred']} with a preferred alternative): nothing to study; "
            "use more images (--limit) or another image source")

    def unit_fn(ev: dict) -> list[dict]:
        inputs = event_inputs(lm, data, ev)
        cf = event_inputs(lm, data, ev, counterfactual=True) if ev.get("cue") else None
        tok_id, pref_id = int(ev["token_id"]), int(ev["preferred_id"])
        if study == "dpo":
            prompt_inputs = event_inputs(lm, data, ev, prefix=False)
            prefix_ids = [int(t) for t in ev["prefix_ids"]]
            layers = dpo.fired_layers(lm, prompt_inputs, prefix_ids, cfg)
            if not layers:
                return [{"event": ev["key"], "fired": False}]
            rows = dpo.alignment(lm, inputs, cf, tok_id, pref_id, cfg, layers, seed=seed)
            return [{"event": ev["key"], "fired": True, **r} for r in rows]
        kinds = {"ablation": ("ablation",), "patching": ("patching",), "localization": ("ablation", "patching")}[study]
        maps = causal.causal_maps(lm, inputs, tok_id, pref_id, cf, kinds=kinds, batch_size=batch_size)
        rows = _tidy_maps(ev["key"], maps)
        if study == "localization":
            rows += _detector_rows(lm, data.image(int(ev["image"])), [int(t) for t in ev["prefix_ids"]], ev["key"],
                                   seed, data.prompt)
        return rows

    records = hall.astype(object).where(hall.notna(), None).to_dict(orient="records")  # NaN -> None
    units = [(r["key"], r) for r in records]
    df = run_sweep(units, unit_fn, store, progress=progress, desc=f"{study} over {len(units)} events")
    tables = _finalize(study, events, df, summary)
    _write_tables(out, tables, summary)
    return StudyResult(study, events, tables, summary)


def _finalize(study: str, events: pd.DataFrame, df: pd.DataFrame, summary: dict) -> dict[str, pd.DataFrame]:
    """The study's tidy tables from its per-event rows ``df`` (adds plain numbers to ``summary``)."""
    tables: dict[str, pd.DataFrame] = {"events": events}
    if study == "dpo":
        fired = df[df["fired"].astype(bool)] if len(df) else df
        summary["n_events_fired"] = int(fired.event.nunique()) if len(fired) else 0
        summary["n_events_not_fired"] = int(df[~df["fired"].astype(bool)].event.nunique()) if len(df) else 0
        rows = fired.drop(columns=["fired", "key"], errors="ignore")
        tables["dpo"] = rows
        tables["dpo_summary"] = dpo.summarize(rows) if len(rows) else pd.DataFrame()
    else:
        maps = df[df["map"].notna()] if "map" in df else df
        tables["maps"] = maps[["event", "map", "layer", "head", "effect"]]
        if study in ("patching", "localization"):
            summary["attribution_vs_exact_spearman"] = _attribution_agreement(maps)
        if study == "localization":
            dets = df[df["detector"].notna()] if "detector" in df else pd.DataFrame()
            tables["detectors"] = dets[["event", "detector", "level", "layer", "head", "score"]]
            agree = _agreement(maps, dets)
            tables["agreement"] = agree
            s = localization.summarize(agree)
            tables["localization_summary"] = s
            summary["verdict"] = [localization.verdict(s, m) for m in ("correct_layer", "layer_zero", "patch_layer")]
    return tables


def merge_study(study: str, dirs: list[str | Path], out: str | Path) -> StudyResult:
    """Merge the shards of one study (each ``DIR/<study>/`` of ``dleaf study ... --shard i/N``) into
    ``out/<study>/``: same model, images and settings; shards distinct, complete and finished.
    Calibration shards split the fault grid; the other studies' shards split the images."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {STUDIES}")
    dirs = [Path(d) / study if (Path(d) / study / "manifest.json").is_file() else Path(d) for d in dirs]
    manifests = []
    for d in dirs:
        if not (d / "manifest.json").is_file():
            raise SourceError(f"{d} holds no {study} results (no manifest.json)")
        manifests.append(json.loads((d / "manifest.json").read_text()))
    base = check_shards(dirs, manifests, local=("shard", "source"))  # shards may read their own image folders
    for d in dirs:
        if not (d / "summary.json").is_file():
            raise SourceError(f"the shard in {d} has not finished; resume it (run the same command again) first")
    out = Path(out) / study
    out.mkdir(parents=True, exist_ok=True)
    rows = pd.concat([ResultStore(d, m).frame() for d, m in zip(dirs, manifests)], ignore_index=True)
    (out / "manifest.json").write_text(json.dumps({**base, "shard": [0, 1], "merged_from": [str(d) for d in dirs]},
                                                  indent=1, default=str))
    if study == "calibration":
        from dleaf_analysis.studies.calibration import calibration_tables

        tables = calibration_tables(rows, out)
        return StudyResult(study, pd.DataFrame(), tables, json.loads((out / "summary.json").read_text()))
    # `image` is each event's position within its shard; `item` (the image's key) identifies it
    events = pd.concat([pd.read_parquet(d / "events.parquet").assign(shard=m.get("shard", [0, 1])[0])
                        for d, m in zip(dirs, manifests)], ignore_index=True)
    events.to_parquet(out / "events.parquet")
    sums = [json.loads((d / "summary.json").read_text()) for d in dirs]
    summary = {k: sum(x.get(k, 0) for x in sums) for k in ("n_images", "n_object_tokens", "n_hallucinated",
                                                            "n_with_preferred", "n_with_cue", "n_cue_was_top_preferred")}
    tables = _finalize(study, events, rows, summary)
    _write_tables(out, tables, summary)
    return StudyResult(study, events, tables, summary)


def _write_tables(out: Path, tables: dict[str, pd.DataFrame], summary: dict) -> None:
    for name, t in tables.items():
        t.to_parquet(out / f"{name}.parquet") if len(t) else None
        if name.endswith("summary") and len(t):
            t.to_csv(out / f"{name}.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))


def _source_manifest(data: ImageSource) -> dict:
    """What identifies the images of a run (scene splits keep their historical keys)."""
    if isinstance(data, SceneSource):  # a shard records which (unsharded runs keep their historical manifest)
        return {"split": data.name, "split_hash": data.split.annotations_hash,
                **({"shard": list(data._shard)} if data._shard != (0, 1) else {})}
    return {"source": data.describe(), "images_hash": data.unsharded_fingerprint, "shard": list(data._shard)}


def _calibration(lm: LoadedModel, data: ImageSource, cfg: DLeaf, out: Path, seed: int, progress: bool, log, faults,
                 tuned_file=None) -> StudyResult:
    from dleaf_analysis.settings import tuned_config
    from dleaf_analysis.studies.calibration import run_calibration

    fault_shard = data._shard  # calibration shards split the fault grid and run on every image
    data = getattr(data, "_parent", data)
    manifest = {"weights_hash": lm.weights_hash, "model_id": lm.model_id, **_source_manifest(data), "n_images": len(data)}
    methods = {m: tuned_config(m, lm.weights_hash, tuned_file) for m in ("dleaf", "uniform", "pai")}
    tables = run_calibration(lm, data, out, manifest, faults=faults, fault_shard=fault_shard,
                             dleaf_config={k: v for k, v in cfg.to_dict().items() if k != "method"},
                             methods=methods, seed=seed, progress=progress, log=log)
    summary = json.loads((out / "summary.json").read_text())
    return StudyResult("calibration", pd.DataFrame(), tables, summary)


def _detector_rows(lm, image, prefix_ids: list[int], key: str, seed: int, prompt: str = DEFAULT_CAPTION_PROMPT) -> list[dict]:
    """Detector scores at the event's step: layers ``[L]`` and heads ``[L, H]``.  The trace covers
    every step of the generated prefix, so the running detectors (``liae-z``) see the same
    history as D-LEAF in decoding; the last step is the event's."""
    from dleaf_analysis.tracing import trace_forward

    c = trace_forward(lm, image, prompt=prompt, continuation_ids=prefix_ids, backend="hooks")
    rows = []
    event_seed = derive_seed(seed, key)
    for det in D.LAYER_DETECTORS:
        sc = D.layer_scores(c, det, seed=event_seed)[-1]
        rows += [{"event": key, "detector": det, "level": "layer", "layer": l, "head": -1, "score": float(v)}
                 for l, v in enumerate(sc)]
    for det in D.HEAD_DETECTORS:
        # heads that warrant correction: low focus -> suspect score = -IAF
        sc = -D.head_scores(c, det, seed=event_seed)[-1]
        rows += [{"event": key, "detector": det, "level": "head", "layer": l, "head": h, "score": float(sc[l, h])}
                 for l in range(sc.shape[0]) for h in range(sc.shape[1])]
    return rows


def _agreement(maps: pd.DataFrame, dets: pd.DataFrame) -> pd.DataFrame:
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
                    rho, hit = localization.rank_agreement(dg.sort_values("layer")["score"].to_numpy(), causal_score, 2)
                    rows.append({"event": ev, "level": "layer", "causal_map": cmap, "detector": det,
                                 "spearman": rho, "topk_hit": hit})
                t = totals.loc[cmap].sort_index()
                others = (t["count"].to_numpy() - 1).clip(min=1)
                loo = -(t["sum"].to_numpy() - g.sort_values("layer")["effect"].to_numpy()) / others
                baselines = {"causal-profile": loo}
                if profile is not None and len(profile) == len(causal_score):
                    baselines["layer-profile"] = profile
                for det, sc in baselines.items():
                    rho, hit = localization.rank_agreement(sc, causal_score, 2)
                    rows.append({"event": ev, "level": "layer", "causal_map": cmap, "detector": det,
                                 "spearman": rho, "topk_hit": hit})
            else:
                L = g["layer"].max() + 1
                cs = causal_score.reshape(L, -1)
                for det, dg in d_ev[d_ev.level == "head"].groupby("detector"):
                    ds = dg.sort_values(["layer", "head"])["score"].to_numpy().reshape(L, -1)
                    per = [localization.rank_agreement(ds[l], cs[l], 1) for l in range(L)]
                    rows.append({"event": ev, "level": "head", "causal_map": cmap, "detector": det,
                                 "spearman": float(np.mean([p[0] for p in per])),
                                 "topk_hit": float(np.mean([p[1] for p in per]))})
    return pd.DataFrame(rows)


def _attribution_agreement(maps: pd.DataFrame) -> float:
    """Spearman between attribution patching and exact head patching, over all (event, head)."""
    a = maps[maps["map"] == "attribution_head"].set_index(["event", "layer", "head"])["effect"]
    e = maps[maps["map"] == "patch_head"].set_index(["event", "layer", "head"])["effect"]
    j = pd.concat([a, e], axis=1, keys=["attr", "exact"]).dropna()
    return float(spearmanr(j["attr"], j["exact"]).statistic) if len(j) > 2 else float("nan")
