"""Cost of the localisation study per hallucination event at LLaVA-1.5-7B's depth and heads, counted
by the patching engine itself, with today's engine and the new ones side by side in one run.

1. **Counts** (measured): one event's causal maps (ablation + patching, as the localisation study
   runs them) on a random LLaVA-1.5 with LLaVA-1.5-7B's 32 layers x 32 heads (narrow: hidden 64,
   112 px), under :func:`dleaf_analysis.lens.cost_meter` (forward-equivalents: a full forward of
   one sequence = 1, a copy from layer ``l`` = ``(L - l) / L``, a KV-cached one-token step =
   ``1 / T``, a backward = 2) and a hook counting the rows the vision tower encodes, for

   - ``today``: ``engine="input"`` -- every copy a full-sequence forward, the vision tower in
     every copy (the engine before issue 23);
   - ``layer``: copies start at their layer over the cached clean layer inputs; last-row
     corrections as one step over the clean KV cache; the image encoded once per run;
   - ``layer + IG``: as ``layer``, head maps ranked by per-layer midpoint integrated gradients
     and verified by exact patching on the top 10% of cells plus a random 5%.

   The counts do not depend on the width, so they hold at 7B; they grow with the sequence only
   through the ``1 / T`` steps, counted at this model's length.
2. **FLOPs** (measured on the meta device, no weights): one forward of LLaVA-1.5-7B's language
   model (Llama-7B, eager attention) and of its vision tower (CLIP ViT-L/14-336) at the length of
   a COCO event (``--tokens``: 576 image tokens + prompt + caption prefix).
3. **Time** = FLOPs / an *assumed* sustained throughput (``--tflops``, default 125: about 40% of an
   A100's bf16 peak); **memory** = bf16 weights + the cached layer inputs and head outputs + the
   larger of the batched copies' per-layer transient and the activations an integrated-gradients
   backward keeps (measured on meta with ``saved_tensors_hooks``).

    python benchmarks/study_cost.py [--tokens 650] [--tflops 125] [--events 300] [--readme]
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
from torch.utils.flop_counter import FlopCounterMode

from dleaf_analysis import lens
from dleaf_analysis.models.tiny import synthetic_event
from dleaf_analysis.studies import causal
from dleaf_analysis.tables import md_table

LLAVA15_7B = dict(layers=32, heads=32, hidden=4096, intermediate=11008, vocab=32064, image_tokens=576)
ENGINES = {"today (full forwards)": dict(engine="input"),
           "layer": dict(engine="layer"),
           "layer + IG ranking": dict(engine="layer", head_ranking="attribution",
                                      ranking_options={"top_fraction": 0.1, "random_fraction": 0.05, "seed": 0})}


def one_event(layers: int = 32, heads: int = 32):
    """A random LLaVA-1.5 of 7B's depth and heads, a clean and a counterfactual image, a token pair."""
    return synthetic_event(layers, heads)


def count(lm, inputs, cf, t, p, **engine) -> dict:
    """Forward-equivalents, sequences and vision-tower rows of one event's maps, and CPU seconds."""
    rows = [0]
    tower = lm.model.model.vision_tower
    h = tower.register_forward_pre_hook(lambda m, a, kw: rows.__setitem__(0, rows[0] + (a[0] if a else kw["pixel_values"]).shape[0]),
                                        with_kwargs=True)
    t0 = time.process_time()
    try:
        with lens.cost_meter() as cost:
            maps = causal.causal_maps(lm, inputs, t, p, cf, **engine)
    finally:
        h.remove()
    return {**cost, "vision_rows": rows[0], "cpu_s": time.process_time() - t0, "maps": maps}


def flops_and_memory(T: int) -> tuple[float, float, float]:
    """``(LM forward FLOPs, vision-tower FLOPs, bytes an LM backward keeps)`` at LLaVA-1.5-7B's shape."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    c = LLAVA15_7B
    text = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
                       max_position_embeddings=4096)
    text._attn_implementation = "eager"
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
    with torch.device("meta"):
        lm_ = LlamaForCausalLM(text).to(torch.bfloat16).eval()
        vm = CLIPVisionModel(vision).to(torch.bfloat16).eval()
    emb = torch.zeros(1, T, c["hidden"], device="meta", dtype=torch.bfloat16)
    mask = torch.ones(1, T, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        lm_(inputs_embeds=emb, attention_mask=mask)
    f_lm = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vm(pixel_values=torch.zeros(1, 3, 336, 336, device="meta", dtype=torch.bfloat16))
    f_vis = fc.get_total_flops()
    saved: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in lm_.parameters()}

    def pack(t):  # activations only, each storage once (views share it)
        st = t.untyped_storage()
        if st._cdata not in weights:
            saved[st._cdata] = st.nbytes()
        return t

    for p in lm_.parameters():  # as in the studies (lens.frozen_parameters): no weight gradients
        p.requires_grad_(False)
    emb = emb.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_(inputs_embeds=emb, attention_mask=mask)
    return f_lm, f_vis, sum(saved.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=650, help="sequence length of an event (576 image tokens + text)")
    ap.add_argument("--tflops", type=float, default=125.0, help="assumed sustained bf16 throughput (TFLOP/s)")
    ap.add_argument("--events", type=int, default=300, help="events of the study to price")
    ap.add_argument("--batch", type=int, default=32, help="--batch-size of the study (intervened copies per forward)")
    ap.add_argument("--readme", action="store_true", help="print the README block")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm, inputs, cf, t, p = one_event()
    counted = {name: count(lm, inputs, cf, t, p, **kw) for name, kw in ENGINES.items()}
    ref = counted["today (full forwards)"]["maps"]
    for name, c in counted.items():  # same maps (exact cells) from every engine
        for m, v in c["maps"].items():
            if m.startswith(("ig:", "exact:")) or not isinstance(v, np.ndarray):
                continue
            mask = c["maps"].get(f"exact:{m}", np.ones_like(v, bool))
            assert np.allclose(v[mask], ref[m][mask], atol=2e-3 * max(np.abs(ref[m]).max(), 1e-3)), (name, m)
    f_lm, f_vis, saved = flops_and_memory(args.tokens)
    c7, T = LLAVA15_7B, args.tokens
    weights = 7.06e9 * 2
    held = 4 * c7["layers"] * T * c7["hidden"] * 2  # clean and counterfactual layer inputs and head outputs
    eager = 2 * c7["heads"] * T * T * 4  # eager attention's fp32 scores and probabilities (pattern edits)
    mlp = 3 * T * c7["intermediate"] * 2
    rows = []
    today = counted["today (full forwards)"]
    for name, c in counted.items():
        lm_flops = c["forward_equivalents"] * f_lm
        vis_flops = c["vision_rows"] * f_vis
        flops = lm_flops + vis_flops
        per_copy = mlp + (eager if name.startswith("today") else 0)  # the new engine's copies edit no pattern: sdpa
        mem = weights + held + max(args.batch * per_copy, saved if "IG" in name else 0)
        rows.append({
            "engine": name, "forward-equivalents / event": round(c["forward_equivalents"], 1),
            "x today": round(c["forward_equivalents"] / today["forward_equivalents"], 3),
            "vision-tower rows": c["vision_rows"], "TFLOP / event": round(flops / 1e12, 1),
            f"GPU-hours / {args.events} events": round(args.events * flops / args.tflops / 1e12 / 3600, 1),
            f"est. GB at --batch-size {args.batch}": round(mem / 1e9, 1),
            "CPU s here (32x32, narrow)": round(c["cpu_s"], 1)})
    df = pd.DataFrame(rows)
    lines = [
        f"One localisation event (ablation + patching maps) on a random LLaVA-1.5 of LLaVA-1.5-7B's depth and "
        f"heads ({c7['layers']} layers x {c7['heads']} heads; narrow), counted by the engine "
        "(`lens.cost_meter`: a full forward = 1, a copy from layer l = (L - l)/L, a KV-cached step = 1/T, a "
        "backward = 2) with the vision tower's rows hooked; every engine's exact cells equal today's maps. "
        f"FLOPs per LLaVA-1.5-7B forward measured on meta tensors at {T} tokens ({f_lm / 1e12:.2f} TFLOP language "
        f"model, {f_vis / 1e12:.2f} vision tower); time at an assumed {args.tflops:g} TFLOP/s sustained; memory = bf16 "
        f"weights ({weights / 1e9:.1f} GB) + cached layer inputs and head outputs ({held / 1e9:.2f} GB) + the larger "
        f"of {args.batch} copies' per-layer transient and an integrated-gradients backward's saved activations "
        f"({saved / 1e9:.1f} GB, measured on meta).",
        "",
        md_table(df),
    ]
    text = "\n".join(lines)
    print(text)
    if args.readme:
        from dleaf_analysis.report import splice_readme

        splice_readme(text, "perf-studies", readme=Path(__file__).resolve().parent / "README.md")


if __name__ == "__main__":
    main()
