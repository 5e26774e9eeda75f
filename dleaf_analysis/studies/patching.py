"""The patching study: per hallucination event with a cue object, each head's and layer's output
patched from the counterfactual run (the cue removed from the image), in both directions, and
attribution patching (one forward and one backward) with its agreement with exact patching."""

from __future__ import annotations

from dleaf_analysis.studies import causal
from dleaf_analysis.studies.base import Study, register
from dleaf_analysis.studies.events import event_inputs
from dleaf_analysis.studies.maps import attribution_agreement, maps_table, tidy_maps


@register
class Patching(Study):
    name = "patching"
    description = ("Counterfactual patching (cue removed from the image) of every head and layer, and attribution "
                   "patching against it.")
    needs_cue = True
    figures = ("causal_heatmaps",)

    def unit(self, ctx, ev: dict) -> list[dict]:
        inputs = event_inputs(ctx.lm, ctx.source, ev)
        cf = event_inputs(ctx.lm, ctx.source, ev, counterfactual=True)
        maps = causal.causal_maps(ctx.lm, inputs, int(ev["token_id"]), int(ev["preferred_id"]), cf,
                                  kinds=("patching",), batch_size=ctx.batch_size)
        return tidy_maps(ev["key"], maps)

    def finalize(self, ctx, events, rows, summary):
        maps = maps_table(rows)
        summary["attribution_vs_exact_spearman"] = attribution_agreement(maps)
        return {"events": events, "maps": maps}
