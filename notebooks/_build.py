"""Writes the walkthrough notebooks (outputs stripped).  Run: python notebooks/_build.py"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
SETUP = '''import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
QUICK = os.environ.get("DLEAF_QUICK", "0") == "1"   # CI runs every notebook with small settings
import matplotlib.pyplot as plt
import seaborn as sns
import pandas as pd
pd.set_option("display.width", 160)'''


def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    return n


NOTEBOOKS = {
"01_quickstart.ipynb": [
"""md:# 1. Quickstart: caption, trace, LIAE and IAF

This notebook loads the embedded LLaVA (a real `LlavaForConditionalGeneration` trained on the
synthetic scene world), captions an image, traces the generation with nnsight, and shows the two
D-LEAF diagnostics as tidy DataFrames and heatmaps:

- **LIAE** (Layer Image Attention Entropy): per layer and step; high = the layer's attention is
  spread over the whole image;
- **IAF** (Image Attention Focus): per head; how much attention the head puts on the image.

Definitions: `docs/method.md`.""",
SETUP,
"""from dleaf_analysis.models import load_model, caption
from dleaf_analysis.scenes import load_split, to_pil

lm = load_model()                      # data/embedded-llava; load_model("path/to/llava-1.5-7b-hf") for a real one
test = load_split("test", limit=8)
i = 1
print("objects in the image:", sorted(test.scenes[i].name_set))
print("greedy caption:      ", caption(lm, [test.image(i)], progress=False)[0])
to_pil(test.image(i)).resize((192, 192), 0)""",
"""md:## Trace the generation

`trace_generation` runs greedy decoding under an nnsight trace and records, at every step, each
layer's and head's attention over the 144 image tokens (plus the attention mass on system, image,
prompt and generated tokens).""",
"""from dleaf_analysis.tracing import trace_generation

cache = trace_generation(lm, test.image(i))
cache""",
"""liae = cache.liae_frame()             # one row per (step, layer)
liae.head(8)""",
"""ax = sns.heatmap(liae.pivot(index="layer", columns="step", values="liae"), cmap="viridis")
ax.set_xticklabels(cache.token_strs, rotation=70); ax.set_title("LIAE per layer and generated token"); plt.show()""",
"""heads = cache.to_frame()                # one row per (step, layer, head)
heads[["step", "token", "layer", "head", "iaf", "image_entropy", "mass_image", "mass_generated"]].head()""",
"""iaf = heads.groupby(["layer", "head"])["iaf"].mean().unstack()
sns.heatmap(iaf, annot=True, fmt=".2f", cmap="rocket"); plt.title("IAF (image attention mass), mean over steps"); plt.show()""",
"""md:## The uniform detectors, side by side

`diagnose` ranks layers at every step by LIAE and by the uniform detectors the paper argues
against (image-attention mass, entropy of the whole row, all layers, random).""",
"""from dleaf_analysis import diagnostics as D

table = D.diagnose(cache)
table[table["rank"] == 0].pivot(index="step", columns="detector", values="layer").head(10)""",
],
"02_localisation.ipynb": [
"""md:# 2. Localisation: which layers and heads cause a hallucination?

For a hallucination event (a generated object that is not in the image) we measure how much each
layer and head moves `log p(hallucinated) - log p(preferred)` when it is ablated, corrected alone,
or patched from a counterfactual image (the cue object removed, every other pixel identical), and
ask whether LIAE / IAF rank the components like the causal maps do, better than the uniform
detectors.""",
SETUP,
"""from dleaf_analysis.models import load_model
from dleaf_analysis.scenes import load_split
from dleaf_analysis.studies.events import find_events, event_inputs

lm = load_model()
split = load_split("dev", limit=40 if QUICK else 80)
events = find_events(lm, split, progress=False)
events.kind.value_counts()""",
"""hall = events[(events.kind == "hallucinated") & events.preferred.notna() & events.cue.notna()]
ev = hall.iloc[0].to_dict()
{k: ev[k] for k in ("image", "token", "preferred", "cue", "prefix")}""",
"""from dleaf_analysis.studies.causal import causal_maps

tok = lm.tokenizer.convert_tokens_to_ids
maps = causal_maps(lm, event_inputs(lm, split, ev), tok(ev["token"]), tok(ev["preferred"]),
                   event_inputs(lm, split, ev, counterfactual=True))
fig, axes = plt.subplots(1, 4, figsize=(14, 3))
for ax, name in zip(axes, ["head_zero", "correct_head", "patch_head", "attribution_head"]):
    sns.heatmap(maps[name], ax=ax, cmap="RdBu_r", center=0); ax.set_title(name); ax.set_xlabel("head"); ax.set_ylabel("layer")
plt.tight_layout(); plt.show()""",
"""md:Negative = the intervention suppresses the hallucination. Attribution patching (one forward and
one backward pass) approximates exact patching (one forward per head).

## The detector comparison over many events""",
"""from dleaf_analysis.studies.runner import run_study
import tempfile

res = run_study("localization", "dev", limit=25 if QUICK else 100, out=tempfile.mkdtemp(), lm=lm, progress=False)
for line in res.summary["verdict"]:
    print(line)
s = res.tables["localization_summary"]
s[(s.level == "layer") & (s.metric == "spearman")].pivot(index="detector", columns="causal_map", values="mean").round(3)""",
],
"03_dleaf.ipynb": [
"""md:# 3. D-LEAF against its baselines

D-LEAF fires on layers whose LIAE exceeds a dynamic threshold and fuses their low-focus heads
toward the best head (`a_h <- (1 - gamma) a_h + gamma a_best`), inside generation, with the KV
cache and no extra forward pass. Here: captions under each method, then CHAIR and POPE under one
protocol. All methods run at the settings the tuning study chose on the dev split.""",
SETUP,
"""from dleaf_analysis.models import load_model, caption
from dleaf_analysis.scenes import load_split
from dleaf_analysis.interventions import get_method
from dleaf_analysis.settings import tuned_config

lm = load_model()
split = load_split("test-partner-absent", limit=6)
imgs = [split.image(i) for i in range(len(split))]
rows = []
for name in ("greedy", "dleaf", "uniform", "pai", "vcd"):
    m = get_method(name, tuned_config(name, lm.weights_hash))
    for i, c in enumerate(caption(lm, imgs, progress=False, decode=m.generate)):
        rows.append({"image": i, "objects": ", ".join(sorted(split.scenes[i].name_set)), "method": name, "caption": c})
pd.DataFrame(rows).pivot(index=["image", "objects"], columns="method", values="caption")""",
"""md:## What D-LEAF did

The method records which layers fired, at which step, and which heads it corrected.""",
"""from dleaf_analysis.models.inputs import PromptBuilder

d = get_method("dleaf", tuned_config("dleaf", lm.weights_hash))
inputs = PromptBuilder(lm.processor).inputs(imgs[:1], ["describe the image ."])
d.generate(lm, inputs, max_new_tokens=32, do_sample=False, pad_token_id=lm.pad_token_id)
pd.DataFrame(d.log).head(10)""",
"""md:## CHAIR and POPE, with bootstrap CIs""",
"""from dleaf_analysis.report import compare_methods
import tempfile
from pathlib import Path

methods = {m: tuned_config(m, lm.weights_hash) for m in ("greedy", "dleaf", "pai")}
out = Path(tempfile.mkdtemp())
chair = compare_methods("chair", "test", lm, methods, out, limit=30 if QUICK else 500, progress=False)
chair.pivot(index="method", columns="metric", values="value").round(2)""",
"""pope = compare_methods("pope", "test", lm, methods, out, limit=10 if QUICK else 500, progress=False)
pope[pope.metric.isin(["accuracy", "f1"])].pivot(index=["variant", "method"], columns="metric", values="value").round(2)""",
],
"04_dpo_alignment.ipynb": [
"""md:# 4. Theorem 1, measured: does D-LEAF's correction move the embedding the way DPO would?

For a hallucination event, at a layer D-LEAF corrects: `x+` is the residual stream in the plain
run, `xD` under D-LEAF, `x-` the preferred embedding (the counterfactual run without the cue
object), and `g` the gradient of `log p(preferred) - log p(hallucinated)` at `x+` (proportional to
minus the DPO gradient at `pi = pi_ref`). We compare `cos(xD - x+, g)`,
`cos(xD - x+, x- - x+)` and `|xD - x-| / |x+ - x-|` with a null: fusing as many random heads
toward a random head.""",
SETUP,
"""from dleaf_analysis.models import load_model
from dleaf_analysis.scenes import load_split, render
from dleaf_analysis.studies.events import find_events, event_inputs
from dleaf_analysis.studies import dpo
from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.settings import tuned_config

lm = load_model()
split = load_split("dev", limit=30)
events = find_events(lm, split, progress=False)
hall = events[(events.kind == "hallucinated") & events.preferred.notna() & events.cue.notna()]
cfg = DLeaf(**tuned_config("dleaf", lm.weights_hash))
ev, layers = None, []
for e in hall.to_dict(orient="records"):
    # the layers D-LEAF itself fires at the event's step, read from its own log over the prefix
    prefix_ids = lm.tokenizer(e["prefix"], add_special_tokens=False)["input_ids"] if e["prefix"] else []
    layers = dpo.fired_layers(lm, event_inputs(lm, split, {**e, "prefix": ""}), prefix_ids, cfg)
    if layers:
        ev = e
        break
print(ev["prefix"], "->", ev["token"], "(preferred:", ev["preferred"], ") corrected layers:", layers)""",
"""tok = lm.tokenizer.convert_tokens_to_ids
rows = dpo.alignment(lm, event_inputs(lm, split, ev), event_inputs(lm, split, ev, counterfactual=True),
                     tok(ev["token"]), tok(ev["preferred"]), cfg, layers, n_null=5)
pd.DataFrame(rows)""",
"""md:## Over many events, with a one-sided test""",
"""from dleaf_analysis.studies.runner import run_study
import tempfile

res = run_study("dpo", "dev", limit=25 if QUICK else 150, out=tempfile.mkdtemp(), lm=lm, progress=False)
res.tables["dpo_summary"].round(3)""",
],
"05_real_checkpoints.ipynb": [
"""md:# 5. The same analysis on a llava-hf checkpoint from a local path

Everything in this suite takes a model directory. On a GPU machine with LLaVA-1.5-7B downloaded
(`llava-hf/llava-1.5-7b-hf`), you would write `load_model("/models/llava-1.5-7b-hf",
device="cuda", dtype="bf16")`; nothing else changes (576 image tokens, 32 layers x 32 heads).
Here, with no weights available, we save a tiny randomly initialised model of the same class and
image geometry (336 px, patch 14, 576 image tokens) in the llava-hf directory layout and run the
same code on it. Its outputs are meaningless; the point is that the code path is the real one.""",
SETUP,
"""import tempfile, numpy as np
from pathlib import Path
from dleaf_analysis.models.tiny import tiny_llava15
from dleaf_analysis.models import load_model, caption

path = tiny_llava15(Path(tempfile.mkdtemp()) / "llava-1.5-tiny")
sorted(p.name for p in path.iterdir())""",
"""lm = load_model(path)                 # on a GPU: load_model(path, device="cuda", dtype="bf16")
image = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)
print(type(lm.model).__name__, lm.model.config.text_config.num_hidden_layers, "layers")
caption(lm, [image], max_new_tokens=8, progress=False)""",
"""from dleaf_analysis.tracing import trace_generation

cache = trace_generation(lm, image, max_new_tokens=6)
print(cache)            # 576 image tokens, as in LLaVA-1.5
cache.liae_frame().pivot(index="layer", columns="step", values="liae").round(3)""",
"""from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.models.inputs import PromptBuilder

d = DLeaf(k=0.0)        # tuned settings are model-specific: a real model needs its own tuning run (dleaf tune --model ...)
inputs = PromptBuilder(lm.processor).inputs([image], ["describe the image ."], lm.image_size)
d.generate(lm, inputs, max_new_tokens=6, do_sample=False, pad_token_id=lm.pad_token_id)
pd.DataFrame(d.log).head()""",
"""md:On a GPU machine, the same calls scale: traces keep only the current query's image columns per
step (2.4 MB per token for LLaVA-1.5-7B in fp32) and can stream to disk (`stream_to=`).""",
],
}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbf.write(nb(cells), HERE / name)
        print("wrote", name)
