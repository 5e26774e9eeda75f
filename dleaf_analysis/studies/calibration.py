"""Calibration by planted faults: what can each study and detector see when the cause is known?

A *fault* is planted through the hook point while the model decodes: in one layer, on a subset
of heads, on a random fraction of decoding steps (drawn per image from a seed), each head's
attention row of the current query is damaged with a strength ``s`` in ``[0, 1]``:

- ``diffuse``: its image columns move toward a uniform distribution of the same image mass,
  ``a_I <- (1 - s) a_I + s m / n`` (where it looks inside the image is lost; how much is kept);
- ``drain``: image mass is moved to the text keys, ``a_I <- (1 - s) a_I`` and the text columns
  are scaled up so that the row still sums to 1 (how much it looks is lost).

For each fault this study measures, on the same images as an unfaulted greedy run:

- **harm**: paired difference of CHAIR_s and recall against the unfaulted run;
- **detection**: per-step AUROC of every layer detector for the faulted layer (positives: the
  faulted layer's score at faulted steps; negatives: the same layer's score in the unfaulted
  run) and the top-1 hit rate (the detector ranks the faulted layer first among D-LEAF's
  candidate layers at a faulted step) against its base rate ``1 / #candidates``;
- **IAF**: at faulted steps in the faulted layer, how often the best head (highest IAF) is an
  intact head and which share of the faulted (and of the intact) heads D-LEAF's head rule selects;
- **recovery**: CHAIR_s and recall of D-LEAF, uniform fusion and PAI decoding *with the fault
  in place*, and of an oracle that applies D-LEAF's fusion exactly at the faulted steps and
  heads (toward the best intact head); recovery = share of the fault's harm undone;
- **causal maps**: on hallucination events of the faulted captions (fault on the event's query
  row), whether ``correct_layer`` and ``layer_zero`` rank the faulted layer first.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from dleaf_analysis import detectors, hooks
from dleaf_analysis.evaluation.chair import chair_paired
from dleaf_analysis.interventions import DLeaf, get_method
from dleaf_analysis.interventions.faults import FAULT_KINDS, Fault, FaultEditor, damage  # noqa: F401 (re-exported)
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT, new_token_ids
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.seeding import derive_seed
from dleaf_analysis.sources import ImageSource
from dleaf_analysis.studies.base import Study, register

BASELINE = "layer-profile"  # the layer's mean LIAE over unfaulted steps: a fixed ordering
RECOVERY_METHODS = ("dleaf", "uniform", "pai", "oracle")


def captions_with_fault(lm: LoadedModel, images: list, items: list[int], fault: Fault | None, method: str = "greedy",
              method_config: dict | None = None, max_new_tokens: int = 32, batch_size: int = 16,
              prompt: str = DEFAULT_CAPTION_PROMPT) -> tuple[list[str], list[list[int]]]:
    """Greedy captions (and their generated ids) with ``fault`` planted and ``method`` decoding
    (``oracle``: the fault's oracle fusion)."""
    oracle = method == "oracle"
    m = get_method("greedy" if oracle else method, None if oracle else method_config)
    oracle_cfg = DLeaf(**{k: v for k, v in (method_config or {}).items() if k in DLeaf.__dataclass_fields__}) if oracle else None
    out, out_ids = [], []
    for i in range(0, len(images), batch_size):
        inputs = lm.inputs(images[i:i + batch_size], [prompt] * len(images[i:i + batch_size]))
        with torch.no_grad():
            if fault is None:
                ids = m.generate(lm, inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.pad_token_id)
            else:
                ed = FaultEditor(fault, items[i:i + batch_size], oracle_cfg)
                with hooks.attach_editor(lm.model, ed, inputs):  # the fault first: the method sees the damaged pattern
                    ids = m.generate(lm, inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=lm.pad_token_id)
        gen = new_token_ids(ids[:, inputs["input_ids"].shape[1]:].tolist(), lm)
        out += [lm.tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]
        out_ids += gen
    return out, out_ids


def traces_with_fault(lm: LoadedModel, images: list, items: list[int], fault: Fault | None, max_new_tokens: int,
            prompt: str = DEFAULT_CAPTION_PROMPT):
    """Per image: ``(layer scores {detector: [S, L]}, IAF [S, L, H], active steps [S])``."""
    from dleaf_analysis.tracing import trace_generation

    out = []
    for img, item in zip(images, items):
        inputs = lm.inputs([img], [prompt])
        if fault is None:
            c = trace_generation(lm, None, inputs=inputs, max_new_tokens=max_new_tokens, backend="hooks")
            act = np.zeros(c.n_steps, bool)
        else:
            ed = FaultEditor(fault, [item])
            with hooks.attach_editor(lm.model, ed, inputs):
                c = trace_generation(lm, None, inputs=inputs, max_new_tokens=max_new_tokens, backend="hooks")
            act = ed.active[0, : c.n_steps].numpy()
        scores = {d.name: d.suspect(c).float().numpy() for d in detectors.select("layer")}
        out.append((scores, c.iaf("mass").float().numpy(), act))
    return out


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def default_faults(n_layers: int, n_heads: int, seed: int = 0) -> list[Fault]:
    """The default grid.  Strong faults (every head but one, every step) so that harm is visible:
    both kinds at three strengths in the middle layer, and at full strength in an early and a late
    candidate layer; plus subtle faults (half of the heads, half of the steps, full strength) in
    the middle layer, where IAF has intact heads to prefer."""
    mid = n_layers // 2
    most = tuple(range(max(1, n_heads - 1)))
    half = tuple(range(max(1, n_heads // 2)))
    grid = [Fault(k, mid, most, s, 1.0, seed) for k, s in itertools.product(FAULT_KINDS, (0.25, 0.5, 1.0))]
    for layer in sorted({min(2, n_layers - 1), n_layers - 1} - {mid}):
        grid += [Fault(k, layer, most, 1.0, 1.0, seed) for k in FAULT_KINDS]
    grid += [Fault(k, mid, half, 1.0, 0.5, seed) for k in FAULT_KINDS]
    return grid


def leverage_faults(leverage: pd.DataFrame | None, lm, seed: int = 0, quick: bool = False) -> list[Fault]:
    """Faults planted where the model has leverage (the leverage map, ``leverage_summary``): in the
    (up to three) layers where an all-head fault costs the most recall, if at least 15 points (else
    the two costliest layers), every head but one at full strength on every step, and
    *intermittently* (each step with probability 0.1 and 0.3: what a running threshold can see);
    the drain kind in the costliest layer; and one full fault in the layer of least leverage (a
    control the detectors should find no easier).  Without a leverage map: :func:`default_faults`."""
    ad = ModelAdapter(lm.model)
    L, H = ad.n_layers, ad.n_heads
    if leverage is None or not len(leverage):
        return default_faults(L, H, seed)[: 2 if quick else None]
    lev = leverage.sort_values("drecall")
    strong = [int(l) for l in lev.loc[lev["drecall"] <= -15, "layer"]][:3] or [int(l) for l in lev["layer"][:2]]
    most = tuple(range(max(1, H - 1)))
    grid = []
    for layer in strong:
        grid += [Fault("diffuse", layer, most, 1.0, 1.0, seed), Fault("diffuse", layer, most, 1.0, 0.3, seed),
                 Fault("diffuse", layer, most, 1.0, 0.1, seed)]
    grid.append(Fault("drain", strong[0], most, 1.0, 1.0, seed))
    weakest = int(lev["layer"].iloc[-1])
    if weakest not in strong:
        grid.append(Fault("diffuse", weakest, most, 1.0, 1.0, seed))
    return grid[:2] if quick else grid


def fault_from_dict(d: dict) -> Fault:
    return Fault(d["kind"], int(d["layer"]), tuple(int(h) for h in d["heads"]), float(d.get("strength", 1.0)),
                 float(d.get("step_fraction", 1.0)), int(d.get("seed", 0)))


@register
class Calibration(Study):
    name = "calibration"
    description = ("Planted faults of known place, strength and timing: their harm, whether each registered layer "
                   "detector sees them (per-step AUROC, top-1 hit), IAF's choice of heads, recovery by D-LEAF, uniform "
                   "fusion, PAI and an oracle, and the causal maps on the faulted captions.")
    uses_events = False
    shard_axis = "units"  # shards split the fault grid (paired statistics stay paired) and run on every image
    figures = ("calibration_detection",)
    default_options = {"faults": None, "n_causal_events": 4, "max_new_tokens": None}

    def prepare(self, ctx) -> None:
        lm, source = ctx.lm, ctx.source
        hooks.install(lm.model)
        ad = ModelAdapter(lm.model)
        L, H = ad.n_layers, ad.n_heads
        faults = ([fault_from_dict(d) for d in ctx.options["faults"]] if ctx.options["faults"]
                  else default_faults(L, H, ctx.seed))
        for f in faults:
            f.validate(L, H, allow_all_heads=True)
        images = [source.image(i) for i in range(len(source))]
        items = list(range(len(images)))
        mnt = ctx.options["max_new_tokens"] or source.max_new_tokens
        ctx.log(f"calibration: unfaulted captions and traces of {len(images)} images")
        clean_caps, _ = captions_with_fault(lm, images, items, None, max_new_tokens=mnt, prompt=source.prompt)
        clean_tr = traces_with_fault(lm, images, items, None, mnt, source.prompt)
        cand = ctx.dleaf.candidate_layers(L)
        ctx.extra.update(
            faults=faults, images=images, items=items, max_new_tokens=mnt, L=L, H=H, cand=cand, clean_tr=clean_tr,
            clean_det=source.chair_details(clean_caps),
            profile=np.mean([s["liae"].mean(0) for s, _, _ in clean_tr], axis=0),  # [L] unfaulted layer profile
            methods={"dleaf": {k: v for k, v in ctx.config.dleaf.items()}, **ctx.config.methods})

    def units(self, ctx):
        return [(f.key, f) for f in ctx.extra["faults"]]

    def unit(self, ctx, f: Fault) -> list[dict]:
        lm, source, seed, x = ctx.lm, ctx.source, ctx.seed, ctx.extra
        images, items, max_new_tokens, prompt = x["images"], x["items"], x["max_new_tokens"], source.prompt
        clean_det, clean_tr, profile, cand, H = x["clean_det"], x["clean_tr"], x["profile"], x["cand"], x["H"]
        dcfg, methods, n_causal_events, fault_key = ctx.dleaf, x["methods"], ctx.options["n_causal_events"], f.key
        rows: list[dict] = []
        caps, cap_ids = captions_with_fault(lm, images, items, f, max_new_tokens=max_new_tokens, prompt=prompt)
        det = source.chair_details(caps)
        harm = chair_paired(clean_det, det, n_resamples=500, seed=seed).set_index("metric")
        base = {"fault": fault_key, "kind": f.kind, "layer": f.layer, "heads": list(f.heads), "strength": f.strength,
                "step_fraction": f.step_fraction}
        rows.append({**base, "table": "faults", "dCHAIR_s": harm.loc["CHAIR_s", "diff"],
                     "dCHAIR_s_low": harm.loc["CHAIR_s", "ci_low"], "dCHAIR_s_high": harm.loc["CHAIR_s", "ci_high"],
                     "drecall": harm.loc["recall", "diff"], "drecall_low": harm.loc["recall", "ci_low"],
                     "drecall_high": harm.loc["recall", "ci_high"]})
        # detection and IAF, per step
        tr = traces_with_fault(lm, images, items, f, max_new_tokens, prompt)
        faulted = np.zeros(H, bool)
        faulted[list(f.heads)] = True
        for d in [det.name for det in detectors.select("layer")] + [BASELINE]:
            if d == BASELINE:
                pos = np.concatenate([np.full(int(a.sum()), profile[f.layer]) for _, _, a in tr])
                neg = np.full(sum(len(s["liae"]) for s, _, _ in clean_tr), profile[f.layer])
                top1 = [float(cand[int(np.argmax(profile[cand]))] == f.layer)] * max(1, len(pos))
            else:
                pos = np.concatenate([s[d][a, f.layer] for s, _, a in tr])
                neg = np.concatenate([s[d][:, f.layer] for s, _, _ in clean_tr])
                top1 = np.concatenate([np.array(cand)[np.argmax(s[d][a][:, cand], axis=1)] == f.layer
                                       for s, _, a in tr if a.any()]) if any(a.any() for _, _, a in tr) else []
            rows.append({**base, "table": "detection", "detector": d, "auroc": _auroc(pos, neg),
                         "top1_hit": float(np.mean(top1)) if len(top1) else float("nan"),
                         "top1_base_rate": 1 / len(cand) if f.layer in cand else 0.0, "n_faulted_steps": int(len(pos))})
        iaf_rows = [iaf[a, f.layer] for _, iaf, a in tr if a.any()]
        if iaf_rows:
            iaf = torch.from_numpy(np.concatenate(iaf_rows))  # [N, H]
            sel = dcfg.select_heads(iaf).numpy()
            best = iaf.argmax(-1).numpy()
            rows.append({**base, "table": "iaf", "best_is_intact": float((~faulted[best]).mean()),
                         "faulted_selected": float(sel[:, faulted].mean()),
                         "intact_selected": float(sel[:, ~faulted].mean()), "n_faulted_steps": int(len(iaf))})
        # recovery under the fault
        for name in RECOVERY_METHODS:
            cfg = {k: v for k, v in dcfg.to_dict().items() if k != "method"} if name == "oracle" else methods.get(name, {})
            mcaps, _ = captions_with_fault(lm, images, items, f, name, cfg, max_new_tokens=max_new_tokens, prompt=prompt)
            mdet = source.chair_details(mcaps)
            vs_clean = chair_paired(clean_det, mdet, n_resamples=500, seed=seed).set_index("metric")
            vs_fault = chair_paired(det, mdet, n_resamples=500, seed=seed).set_index("metric")
            harm_s, harm_r = harm.loc["CHAIR_s", "diff"], harm.loc["recall", "diff"]
            rows.append({**base, "table": "recovery", "method": name,
                         "dCHAIR_s_vs_unfaulted": vs_clean.loc["CHAIR_s", "diff"],
                         "drecall_vs_unfaulted": vs_clean.loc["recall", "diff"],
                         "dCHAIR_s_vs_faulted": vs_fault.loc["CHAIR_s", "diff"],
                         "dCHAIR_s_vs_faulted_low": vs_fault.loc["CHAIR_s", "ci_low"],
                         "dCHAIR_s_vs_faulted_high": vs_fault.loc["CHAIR_s", "ci_high"],
                         "recovery_CHAIR_s": -vs_fault.loc["CHAIR_s", "diff"] / harm_s if harm_s > 0 else float("nan"),
                         "recovery_recall": vs_fault.loc["recall", "diff"] / -harm_r if harm_r < 0 else float("nan")})
        rows += _causal_rows(lm, source, images, cap_ids, f, base, n_causal_events)
        return rows

    def finalize(self, ctx, events, rows, summary):
        tables = calibration_tables(rows)
        summary.update(calibration_summary(tables))
        return tables


def calibration_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tidy tables from the calibration's per-fault rows."""
    tables = {}
    for name in ("faults", "detection", "iaf", "recovery", "causal"):
        t = df[df["table"] == name] if "table" in df else df.iloc[:0]
        tables[name] = t.reindex(columns=_TABLE_COLUMNS[name]).reset_index(drop=True)
    return tables


_TABLE_COLUMNS = {
    "faults": ["fault", "kind", "layer", "heads", "strength", "step_fraction", "dCHAIR_s", "dCHAIR_s_low",
               "dCHAIR_s_high", "drecall", "drecall_low", "drecall_high"],
    "detection": ["fault", "kind", "layer", "heads", "strength", "step_fraction", "detector", "auroc", "top1_hit",
                  "top1_base_rate", "n_faulted_steps"],
    "iaf": ["fault", "kind", "layer", "heads", "strength", "step_fraction", "best_is_intact", "faulted_selected",
            "intact_selected", "n_faulted_steps"],
    "recovery": ["fault", "kind", "layer", "heads", "strength", "step_fraction", "method", "dCHAIR_s_vs_unfaulted",
                 "drecall_vs_unfaulted", "dCHAIR_s_vs_faulted", "dCHAIR_s_vs_faulted_low", "dCHAIR_s_vs_faulted_high",
                 "recovery_CHAIR_s", "recovery_recall"],
    "causal": ["fault", "kind", "layer", "heads", "strength", "step_fraction", "image", "correct_layer_top1_is_faulted",
               "layer_zero_top1_is_faulted"],
}


def _causal_rows(lm, source: ImageSource, images: list, cap_ids: list[list[int]], f: Fault, base: dict,
                 n_events: int) -> list[dict]:
    """Causal layer maps on hallucination events of the faulted captions (located in the generated
    ids), the fault planted on the event's query row: does the map rank the faulted layer first?"""
    from dleaf_analysis.studies import causal
    from dleaf_analysis.studies.events import mention_spans, word_ids

    adapter = ModelAdapter(lm.model)
    tok = lm.tokenizer
    rows = []
    for i, ids in enumerate(cap_ids):
        if len(rows) >= n_events:
            break
        _, found = mention_spans(source, tok, ids)
        gt = set(source.objects(i))
        hall = [(m, j) for m, j, _ in found if m.object not in gt]
        if not hall:
            continue
        m, j = hall[0]
        pref = [w[0] for w in (word_ids(tok, source.object_word(o)) for o in sorted(gt - {x.object for x, _, _ in found}))
                if w and w[0] != ids[j]]
        if not pref:
            continue
        inputs = lm.inputs([images[i]], [source.prompt], ids[:j] or None)
        with hooks.attach_editor(lm.model, FaultEditor(f, [i], every_call=True), inputs):
            maps = causal.causal_maps(lm, inputs, ids[j], pref[0], None, kinds=("ablation",))
        row = {**base, "table": "causal", "image": i}
        for name in ("correct_layer", "layer_zero"):
            row[f"{name}_top1_is_faulted"] = float(int(np.argmin(maps[name])) == f.layer)  # most negative = suppresses most
        rows.append(row)
    return rows


def calibration_summary(tables: dict[str, pd.DataFrame]) -> dict:
    """Plain numbers per fault: harm, best detector by AUROC, D-LEAF's and the oracle's recovery."""
    out = {"faults": {}}
    det, rec = tables.get("detection", pd.DataFrame()), tables.get("recovery", pd.DataFrame())
    for _, f in tables.get("faults", pd.DataFrame()).iterrows():
        d = det[det.fault == f.fault] if len(det) else det
        r = rec[rec.fault == f.fault].set_index("method") if len(rec) else rec
        out["faults"][f.fault] = {
            "dCHAIR_s": f.dCHAIR_s, "drecall": f.drecall,
            "auroc": dict(zip(d.detector, d.auroc)) if len(d) else {},
            "recovery_CHAIR_s": dict(r["recovery_CHAIR_s"]) if len(r) else {},
        }
    return out
