"""The ablation study: per hallucination event, how much each head and layer moves
``log p(hallucinated) - log p(preferred)`` when ablated (zero, mean) or corrected alone (D-LEAF's
fusion in one layer, or on one head); see :mod:`dleaf_analysis.studies.causal`."""

from __future__ import annotations

from dleaf_analysis.studies import causal
from dleaf_analysis.studies.base import Study, register
from dleaf_analysis.studies.events import event_inputs
from dleaf_analysis.studies.maps import maps_table, tidy_maps


@register
class Ablation(Study):
    name = "ablation"
    description = ("Ablation and correction maps: the change of the hallucination margin when each head or layer "
                   "is zeroed, mean-ablated or corrected alone (negative = suppresses the hallucination).")
    figures = ("causal_heatmaps",)

    def unit(self, ctx, ev: dict) -> list[dict]:
        inputs = event_inputs(ctx.lm, ctx.source, ev)
        maps = causal.causal_maps(ctx.lm, inputs, int(ev["token_id"]), int(ev["preferred_id"]), None,
                                  kinds=("ablation",), batch_size=ctx.batch_size)
        return tidy_maps(ev["key"], maps)

    def finalize(self, ctx, events, rows, summary):
        return {"events": events, "maps": maps_table(rows)}
