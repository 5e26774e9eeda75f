"""Head patching per event: exact patching against its two estimates, side by side in one run.

On hallucination events (with a cue object) of the embedded model's greedy captions of the dev
split: exact head patching of every head (each copy from its layer over the cached clean layer
inputs), attribution patching (one forward and one backward at the clean run) and per-layer
midpoint integrated gradients (one forward and backward per layer, from that layer on).  Prints
their cost (forward-equivalents counted by the engine, CPU seconds) and how well each estimate
ranks the heads exact patching ranks first: per-event recall@1, recall@3 and recall@10% of the
exact map's top heads (most negative effect first), and the per-event Spearman correlation.

    python benchmarks/patching_cost.py [--events 40] [--images 300] [--readme]
"""

from __future__ import annotations

import argparse
from pathlib import Path
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from dleaf_analysis import lens
from dleaf_analysis.models import load_model
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.sources import SceneSource
from dleaf_analysis.studies import causal
from dleaf_analysis.studies.events import event_inputs, find_events, logit_diff
from dleaf_analysis.tables import md_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=40)
    ap.add_argument("--images", type=int, default=300, help="dev images to caption for events")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model()
    ad = ModelAdapter(lm.model)
    L, H = ad.n_layers, ad.n_heads
    src = SceneSource.load("dev", limit=args.images)
    ev = find_events(lm, src, progress=False)
    ev = ev[(ev.kind == "hallucinated") & ev.preferred.notna() & ev.cue.notna()].head(args.events)
    k10 = max(1, int(np.ceil(0.1 * L * H)))
    rows, cost = [], {m: {"forward_equivalents": 0.0, "cpu_s": 0.0} for m in ("exact", "attribution", "IG")}
    for e in ev.to_dict(orient="records"):
        inp, cf = event_inputs(lm, src, e), event_inputs(lm, src, e, counterfactual=True)
        t, p = int(e["token_id"]), int(e["preferred_id"])
        metric = lambda logits: logit_diff(logits, t, p)  # noqa: E731
        with torch.no_grad():
            _, cf_cache = lens.run_with_cache(lm, cf, names=lambda n: n.endswith("attn.hook_z"))
            clean_z, cf_z = causal.head_outputs(lm, inp), causal.head_outputs(lm, cf)
        maps = {}
        for name, fn in (("exact", lambda: lens.patch(lm, inp, cf_cache, metric, "attn.hook_z", "head", start="layer")),
                         ("attribution", lambda: causal.attribution_patching(lm, inp, t, p, clean_z, cf_z)),
                         ("IG", lambda: lens.integrated_gradients(lm, inp, cf_cache, metric))):
            s = time.process_time()
            with lens.cost_meter() as c:
                maps[name] = fn()
            cost[name]["cpu_s"] += time.process_time() - s
            cost[name]["forward_equivalents"] += c["forward_equivalents"]
        for name in ("attribution", "IG"):
            rows.append({"estimate": name, "event": f"{e['item']}:{e['step']}",
                         "recall@1": causal.recall_at(maps[name], maps["exact"], 1),
                         "recall@3": causal.recall_at(maps[name], maps["exact"], 3),
                         "recall@10%": causal.recall_at(maps[name], maps["exact"], k10),
                         "spearman": spearmanr(maps[name].ravel(), maps["exact"].ravel()).statistic})
    df = pd.DataFrame(rows)
    n = len(ev)
    table = []
    for name in ("exact", "attribution", "IG"):
        r = {"method": name, "forward-equivalents / event": round(cost[name]["forward_equivalents"] / n, 2),
             "CPU ms / event": round(1e3 * cost[name]["cpu_s"] / n, 1),
             "x exact (CPU)": round(cost[name]["cpu_s"] / cost["exact"]["cpu_s"], 3)}
        if name != "exact":
            g = df[df.estimate == name]
            r |= {k: round(float(g[k].mean()), 3) for k in ("recall@1", "recall@3", "recall@10%", "spearman")}
        table.append(r)
    lines = [f"{n} hallucination events with a cue object of the dev split ({args.images} images captioned), embedded "
             f"model ({L} layers x {H} heads); head patching to the counterfactual (cue removed) run; recall@k = "
             f"share of exact patching's top k heads (k = 1, 3 and 10% = {k10}) among the estimate's top k, per event, "
             "averaged; the clean and counterfactual caches every method needs are not counted.", "", md_table(pd.DataFrame(table))]
    text = "\n".join(lines)
    print(text)
    if args.readme:
        from dleaf_analysis.report import splice_readme

        splice_readme(text, "perf-patching", readme=Path(__file__).resolve().parent / "README.md")


if __name__ == "__main__":
    main()
