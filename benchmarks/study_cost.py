"""Cost of the causal studies per hallucination event on LLaVA-1.5-7B: an estimate from measured
counts and measured FLOPs (this machine has no GPU).

1. Sequences per event: every forward (batch rows) and backward the studies run for one event is
   counted on a tiny sub-word LLaVA-1.5-shaped model and checked against the closed form of the
   code (``forward_sequences``), which then gives the count at 32 layers x 32 heads.
2. FLOPs per sequence: counted by ``torch.utils.flop_counter`` on LLaVA-1.5-7B's language model
   (Llama-7B, eager attention) and vision tower (CLIP ViT-L/14-336) built on the meta device (no
   weights), at the sequence length of a COCO event (576 image tokens + prompt + caption prefix).
   A backward pass is counted as twice its forward (the usual estimate).
3. Time = FLOPs / an *assumed* sustained throughput (``--tflops``, default 125: 40% of an A100's
   bf16 peak); memory = bf16 weights + the activations saved for the attribution backward
   (measured on meta with ``saved_tensors_hooks``) or, for batched no-grad forwards, the largest
   per-layer transient (eager attention's fp32 scores and probabilities, the MLP) per copy.

    python benchmarks/study_cost.py [--tokens 650] [--tflops 125] [--readme]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch.utils.flop_counter import FlopCounterMode

from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.loading import load_model
from dleaf_analysis.models.tiny import tiny_llava15_subword_dir
from dleaf_analysis.paths import REPO_ROOT
from dleaf_analysis.sources import CocoSource
from dleaf_analysis.studies import causal
from dleaf_analysis.studies.events import event_inputs, find_events
from dleaf_analysis.studies.runner import _detector_rows
from dleaf_analysis.tables import md_table

LLAVA15_7B = dict(layers=32, heads=32, hidden=4096, intermediate=11008, vocab=32064, image_tokens=576)


def forward_sequences(study: str, L: int, H: int) -> tuple[int, int]:
    """``(forward sequences, backward passes)`` per event of a study (the closed form of
    :func:`dleaf_analysis.studies.causal.causal_maps` and the detector trace)."""
    base = 2  # the clean metric and the clean head outputs
    ablation = 3 * L * H + 2 * L  # head_zero, head_mean, correct_head; layer_zero, correct_layer
    patching = 2 + 2 * L * H + L + 1  # cf head outputs and metric; patch_head(+reverse); patch_layer; attribution
    if study == "ablation":
        return base + ablation, 0
    if study == "patching":
        return base + patching, 1
    if study == "localization":
        return base + ablation + patching + 1, 1  # + the detector trace
    raise ValueError(study)


def dpo_sequences(fired: int, n_null: int = 5) -> tuple[int, int]:
    """``(forwards, backwards)`` of :func:`dleaf_analysis.studies.dpo.alignment`: the clean and
    counterfactual residuals, then per run (D-LEAF and ``n_null`` nulls) the corrected residual and
    one gradient (forward + backward) per fired layer."""
    runs = 1 + n_null
    return 2 + runs * (1 + fired), runs * fired


class _Counter:
    """Counts the sequences (batch rows) of every language-model forward, and backward passes."""

    def __init__(self, model) -> None:
        self.rows = 0
        lm_core = ModelAdapter(model).layers[0]
        self.h = lm_core.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.rows += x.shape[0]


def count_on_tiny() -> tuple[dict, int, int]:
    out = Path(tempfile.mkdtemp())
    lm = load_model(tiny_llava15_subword_dir(out / "m"))
    fake = REPO_ROOT / "tests" / "data" / "fake_coco"
    src = CocoSource(fake / "val2014", fake / "instances_fake2014.json", image_ids=fake / "image_ids.txt")
    ev = find_events(lm, src, progress=False)
    ev = ev[(ev.kind == "hallucinated") & ev.preferred.notna() & ev.cue.notna()].iloc[0].to_dict()
    ad = ModelAdapter(lm.model)
    inputs, cf = event_inputs(lm, src, ev), event_inputs(lm, src, ev, counterfactual=True)
    counted = {}
    for study, kinds in (("ablation", ("ablation",)), ("patching", ("patching",)),
                         ("localization", ("ablation", "patching"))):
        c = _Counter(lm.model)
        causal.causal_maps(lm, inputs, ev["token_id"], int(ev["preferred_id"]), cf, kinds=kinds)
        if study == "localization":
            _detector_rows(lm, src.image(int(ev["image"])), list(ev["prefix_ids"]), "k", 0, src.prompt)
        c.h.remove()
        # attribution's forward carries the backward graph; it is one of the forward rows
        counted[study] = c.rows
    from dleaf_analysis.interventions import DLeaf
    from dleaf_analysis.studies import dpo

    c = _Counter(lm.model)
    dpo.alignment(lm, inputs, cf, ev["token_id"], int(ev["preferred_id"]), DLeaf(), [2, 3], n_null=5)
    c.h.remove()
    assert c.rows == dpo_sequences(fired=2)[0], f"dpo: counted {c.rows} forwards, the closed form says {dpo_sequences(2)[0]}"
    return counted, ad.n_layers, ad.n_heads


def flops_per_sequence(T: int) -> tuple[float, float, float]:
    """``(language model, vision tower, saved-activation bytes of one backward)`` at LLaVA-1.5-7B's shape."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    c = LLAVA15_7B
    text = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
                       max_position_embeddings=4096, torch_dtype=torch.bfloat16)
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

    def pack(t):  # activations only (the weights are there anyway), each storage once (views share it)
        st = t.untyped_storage()
        if st._cdata not in weights:
            saved[st._cdata] = st.nbytes()
        return t

    for p in lm_.parameters():  # as in the studies (causal.frozen_parameters): no weight gradients
        p.requires_grad_(False)
    emb = emb.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_(inputs_embeds=emb, attention_mask=mask)
    return f_lm, f_vis, sum(saved.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=650, help="sequence length of an event (576 image tokens + text)")
    ap.add_argument("--tflops", type=float, default=125.0, help="assumed sustained bf16 throughput (TFLOP/s)")
    ap.add_argument("--batch", type=int, default=32, help="--batch-size of the studies (intervened copies per forward)")
    ap.add_argument("--readme", action="store_true", help="print the README block")
    args = ap.parse_args()
    counted, L, H = count_on_tiny()
    for study, n in counted.items():
        want = forward_sequences(study, L, H)[0]
        assert n == want, f"{study}: counted {n} forward sequences on the tiny model, the closed form says {want}"
    f_lm, f_vis, saved = flops_per_sequence(args.tokens)
    c = LLAVA15_7B
    T = args.tokens
    weights = 7.06e9 * 2
    # largest per-layer transient of a no-grad forward, per copy: eager attention's fp32 scores and
    # probabilities [H, T, T], plus the MLP's three [T, 11008] bf16 activations
    per_copy = 2 * c["heads"] * T * T * 4 + 3 * T * c["intermediate"] * 2
    held = 2 * c["layers"] * T * c["hidden"] * 2  # clean and counterfactual head outputs of every layer
    rows = []
    for study in ("ablation", "patching", "localization"):
        fwd, bwd = forward_sequences(study, c["layers"], c["heads"])
        flops = fwd * (f_lm + f_vis) + bwd * 2 * f_lm
        mem = weights + held + max(args.batch * per_copy, saved if bwd else 0)
        rows.append({"study": study, "forward sequences": fwd, "backward passes": bwd,
                     "TFLOP per event": round(flops / 1e12), "est. minutes per event": round(flops / args.tflops / 1e12 / 60, 1),
                     f"est. GB at --batch-size {args.batch}": round(mem / 1e9, 1)})
    import pandas as pd

    dpo_fwd, dpo_bwd = dpo_sequences(fired=3, n_null=5)

    df = pd.DataFrame(rows)
    lines = [
        f"Estimate for LLaVA-1.5-7B ({c['layers']} layers x {c['heads']} heads, {T} tokens per event: 576 image tokens "
        f"+ prompt + caption prefix), from measured FLOPs ({f_lm / 1e12:.2f} TFLOP per language-model forward, "
        f"{f_vis / 1e12:.2f} for the vision tower; a backward counted as two forwards) and sequence counts checked "
        f"against a counted run ({', '.join(f'{k} {v}' for k, v in counted.items())} sequences on a {L}x{H} tiny "
        f"model); time at an assumed {args.tflops:g} TFLOP/s sustained (about 40% of an A100's bf16 peak); memory = "
        f"bf16 weights ({weights / 1e9:.1f} GB) + the stored head outputs ({held / 1e9:.2f} GB) + the larger of the "
        f"batched copies' per-layer transient ({per_copy / 1e9:.2f} GB per copy) and the activations the attribution "
        f"backward keeps ({saved / 1e9:.1f} GB, measured on meta tensors). The DPO study runs "
        f"{dpo_fwd} forwards and {dpo_bwd} backwards per event with 3 fired layers and 5 null runs (about "
        f"{(dpo_fwd * (f_lm + f_vis) + dpo_bwd * 2 * f_lm) / args.tflops / 1e12 / 60:.1f} min), plus a KV-cached "
        "replay of the caption prefix to read D-LEAF's firings; the calibration study is decoding (captions and "
        "traces per fault and method), like `dleaf evaluate`.",
        "",
        md_table(df),
    ]
    text = "\n".join(lines)
    if args.readme:
        print("<!-- perf-studies:start (generated; do not edit) -->\n" + text + "\n<!-- perf-studies:end -->")
    else:
        print(text)


if __name__ == "__main__":
    main()
