"""The leverage map: which layers does the model read the image in?

For each layer, a full-strength planted fault (:class:`~dleaf_analysis.interventions.faults.Fault`,
``diffuse`` by default: every head's image attention made uniform at the same image mass, at
every decoding step) and greedy captions of the same images; the cost is the paired difference
of recall, CHAIR_s and CHAIR_i against unfaulted greedy decoding (paired bootstrap over images).
A layer whose fault costs many recall points is one where *where* the model looks inside the
image decides what it says: only there can a method that moves attention inside the image
(D-LEAF's fusion, a calibration fault) have leverage.  Calibration plants its faults in the
layers this map finds.
"""

from __future__ import annotations

import pandas as pd

from dleaf_analysis.evaluation.chair import chair_paired
from dleaf_analysis.interventions.faults import FAULT_KINDS, Fault
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.studies.base import Study, register
from dleaf_analysis.studies.calibration import captions_with_fault

LEVERAGE_COLUMNS = ["layer", "kind", "strength", "drecall", "drecall_low", "drecall_high", "dCHAIR_s", "dCHAIR_s_low",
                    "dCHAIR_s_high", "dCHAIR_i", "dCHAIR_i_low", "dCHAIR_i_high", "n_images"]


@register
class Leverage(Study):
    name = "leverage"
    description = ("Per layer, the cost of a full-strength fault on every head at every step (recall, CHAIR_s, "
                   "CHAIR_i against unfaulted greedy decoding on the same images, paired bootstrap).")
    uses_events = False
    shard_axis = "units"  # shards split the layers and run on every image
    figures = ("leverage_map",)
    default_options = {"kind": "diffuse", "strength": 1.0, "n_resamples": 1000, "layers": None}

    def prepare(self, ctx) -> None:
        if ctx.options["kind"] not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {ctx.options['kind']!r}; choose one of {FAULT_KINDS}")
        ad = ModelAdapter(ctx.lm.model)
        src = ctx.source
        images = [src.image(i) for i in range(len(src))]
        kw = dict(max_new_tokens=src.max_new_tokens, batch_size=ctx.batch_size or 16, prompt=src.prompt)
        base = src.chair_details(captions_with_fault(ctx.lm, images, list(range(len(images))), None, **kw)[0])
        ctx.extra.update(images=images, kw=kw, base=base, H=ad.n_heads, L=ad.n_layers)

    def units(self, ctx):
        layers = ctx.options["layers"] if ctx.options["layers"] is not None else range(ctx.extra["L"])
        return [(f"layer:{l}", int(l)) for l in layers]

    def unit(self, ctx, layer: int) -> list[dict]:
        x, o = ctx.extra, ctx.options
        f = Fault(o["kind"], layer, tuple(range(x["H"])), o["strength"], 1.0, ctx.seed)
        det = ctx.source.chair_details(captions_with_fault(ctx.lm, x["images"], list(range(len(x["images"]))), f,
                                                           **x["kw"])[0])
        d = chair_paired(x["base"], det, n_resamples=o["n_resamples"], seed=ctx.seed).set_index("metric")
        row = {"layer": layer, "kind": o["kind"], "strength": o["strength"], "n_images": len(x["images"])}
        for m, col in (("recall", "drecall"), ("CHAIR_s", "dCHAIR_s"), ("CHAIR_i", "dCHAIR_i")):
            row[col], row[f"{col}_low"], row[f"{col}_high"] = d.loc[m, "diff"], d.loc[m, "ci_low"], d.loc[m, "ci_high"]
        return [row]

    def finalize(self, ctx, events, rows, summary):
        t = rows.reindex(columns=LEVERAGE_COLUMNS).sort_values("layer").reset_index(drop=True)
        summary["layers_costing_10_recall_points"] = [int(l) for l in t.loc[t["drecall"] <= -10, "layer"]]
        return {"leverage_summary": t}


def leverage_map(lm, source, kind: str = "diffuse", strength: float = 1.0, layers: list[int] | None = None,
                 batch_size: int = 16, n_resamples: int = 1000, seed: int = 0, out=None, progress: bool = True
                 ) -> pd.DataFrame:
    """The leverage map as a table (runs the study; ``out``: where its resumable results go)."""
    import tempfile

    from dleaf_analysis.studies.base import run_study

    with tempfile.TemporaryDirectory() as tmp:
        res = run_study("leverage", source, limit=None, out=out or tmp, lm=lm, seed=seed, progress=progress,
                        batch_size=batch_size, options={"kind": kind, "strength": strength, "n_resamples": n_resamples,
                                                        "layers": layers}, log=lambda *a: None)
        return res.tables["leverage_summary"]
