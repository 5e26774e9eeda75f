# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Quickstart: caption, trace, LIAE and IAF
#
# This notebook loads the embedded LLaVA (a real `LlavaForConditionalGeneration` trained on the
# synthetic scene world), captions an image, traces the generation with nnsight, and shows the two
# D-LEAF diagnostics as tidy DataFrames and heatmaps:
#
# - **LIAE** (Layer Image Attention Entropy): per layer and step; high = the layer's attention is
#   spread over the whole image;
# - **IAF** (Image Attention Focus): per head; how much attention the head puts on the image.
#
# Definitions: `docs/method.md`.

# %%
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
QUICK = os.environ.get("DLEAF_QUICK", "0") == "1"   # CI runs every notebook with small settings
import matplotlib.pyplot as plt
import seaborn as sns
import pandas as pd
pd.set_option("display.width", 160)

# %%
from dleaf_analysis.models import load_model, caption
from dleaf_analysis.scenes import load_split, to_pil

lm = load_model()                      # data/embedded-llava; load_model("path/to/llava-1.5-7b-hf") for a real one
test = load_split("test", limit=8)
i = 1
print("objects in the image:", sorted(test.scenes[i].name_set))
print("greedy caption:      ", caption(lm, [test.image(i)], progress=False)[0])
to_pil(test.image(i)).resize((192, 192), 0)

# %% [markdown]
# ## Trace the generation
#
# `trace_generation` runs greedy decoding under an nnsight trace and records, at every step, each
# layer's and head's attention over the 144 image tokens (plus the attention mass on system, image,
# prompt and generated tokens).

# %%
from dleaf_analysis.tracing import trace_generation

cache = trace_generation(lm, test.image(i), max_new_tokens=48)  # the first 48 tokens: readable heatmaps
cache

# %%
liae = cache.liae_frame()             # one row per (step, layer)
liae.head(8)

# %%
fig, ax = plt.subplots(figsize=(14, 3))
sns.heatmap(liae.pivot(index="layer", columns="step", values="liae"), cmap="viridis", ax=ax)
ax.set_xticks([k + 0.5 for k in range(cache.n_steps)], cache.token_strs, rotation=90, fontsize=7)
ax.set_title("LIAE per layer and generated token"); plt.show()

# %%
heads = cache.to_frame()                # one row per (step, layer, head)
heads[["step", "token", "layer", "head", "iaf", "image_entropy", "mass_image", "mass_generated"]].head()

# %%
iaf = heads.groupby(["layer", "head"])["iaf"].mean().unstack()
sns.heatmap(iaf, annot=True, fmt=".2f", cmap="rocket"); plt.title("IAF (image attention mass), mean over steps"); plt.show()

# %% [markdown]
# ## The uniform detectors, side by side
#
# `detectors.diagnose` ranks layers at every step by every registered layer detector: LIAE and its
# running z-score (what D-LEAF's threshold compares), and the uniform detectors the paper argues
# against (image-attention mass, entropy of the whole row, all layers, random).

# %%
from dleaf_analysis import detectors

table = detectors.diagnose(cache)
print(detectors.names("layer"))
table[table["rank"] == 0].pivot(index="step", columns="detector", values="layer").head(10)

# %% [markdown]
# ## Where in a description hallucinations come
#
# Like LLaVA-1.5's detailed descriptions, the embedded model's captions name the salient objects
# first and guess later: the hallucination rate by mention rank (1 = the first object the caption
# names), with the share of mentions that come after the caption has named every object in the image.

# %%
from dleaf_analysis.evaluation import regime
from dleaf_analysis.sources import SceneSource

dev = SceneSource.load("dev", limit=40 if QUICK else 200)
caps = caption(lm, [dev.image(k) for k in range(len(dev))], progress=False)
mentions = regime.mention_table(caps, dev.object_sets(), dev.mentions)
prof = regime.position_profile(mentions)
print(regime.position_summary(mentions))
fig, ax = plt.subplots(figsize=(5, 3))
ax.errorbar(prof["rank"], prof["rate"], yerr=[prof["rate"] - prof["ci_low"], prof["ci_high"] - prof["rate"]],
            marker="o", capsize=3)
ax.set_xlabel("mention rank in the caption"); ax.set_ylabel("hallucinated (%), 95% CI"); plt.show()
prof
