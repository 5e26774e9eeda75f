"""Cost of exact head patching vs attribution patching per event, side by side in one run.

Exact patching of every head runs one batched forward per layer (batch = heads); attribution
patching runs one forward and one backward for all heads (plus the clean and counterfactual
forwards both methods need).  Prints forward passes per event, wall time per event, the ratio,
and the Spearman agreement of the two maps over the same events.

    python benchmarks/patching_cost.py [--events 30] [--readme]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
from scipy.stats import spearmanr

from dleaf_analysis import lens
from dleaf_analysis.models import load_model
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.scenes import load_split
from dleaf_analysis.studies import causal
from dleaf_analysis.studies.events import event_inputs, find_events, logit_diff


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=30)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    lm = load_model()
    ad = ModelAdapter(lm.model)
    split = load_split("test", limit=200)
    ev = find_events(lm, split, progress=False)
    ev = ev[(ev.kind == "hallucinated") & ev.preferred.notna() & ev.cue.notna()].head(args.events)
    tok = lm.tokenizer.convert_tokens_to_ids
    t_exact = t_attr = 0.0
    exact_all, attr_all = [], []
    for e in ev.to_dict(orient="records"):
        inp, cf = event_inputs(lm, split, e), event_inputs(lm, split, e, counterfactual=True)
        t, p = tok(e["token"]), tok(e["preferred"])
        clean_z, cf_z = causal.head_outputs(lm, inp), causal.head_outputs(lm, cf)
        _, cf_cache = lens.run_with_cache(lm, cf, names=lambda n: n.endswith("attn.hook_z"))
        s = time.perf_counter()  # exact: one batched forward per layer (+ the clean metric)
        exact = lens.patch_head(lm, inp, cf_cache, lambda logits: logit_diff(logits, t, p))
        t_exact += time.perf_counter() - s
        s = time.perf_counter()
        attr = causal.attribution_patching(lm, inp, t, p, clean_z, cf_z)
        t_attr += time.perf_counter() - s
        exact_all.append(exact.ravel())
        attr_all.append(attr.ravel())
    n = len(ev)
    rho = spearmanr(np.concatenate(exact_all), np.concatenate(attr_all)).statistic
    L, H = ad.n_layers, ad.n_heads
    lines = [
        f"{n} hallucination events of the test split, embedded model ({L} layers x {H} heads); the clean and "
        "counterfactual runs both methods need are not counted.",
        "",
        "| method | forward passes per event (sequences) | backward passes | ms per event | ratio |",
        "|---|---|---|---|---|",
        f"| exact head patching (`lens.patch_head`) | {L} batched ({L * H}) | 0 | {1e3 * t_exact / n:.1f} | 1.00x |",
        f"| attribution patching | 1 (1) | 1 | {1e3 * t_attr / n:.1f} | {t_attr / t_exact:.2f}x |",
        "",
        f"Spearman(attribution, exact) over the {n * L * H} (event, layer, head) cells: {rho:.3f}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.readme:
        from dleaf_analysis.report import splice_readme

        splice_readme(text, "perf-patching")


if __name__ == "__main__":
    main()
