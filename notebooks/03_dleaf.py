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
# # 3. D-LEAF against its baselines
#
# D-LEAF fires on layers whose LIAE exceeds a dynamic threshold and fuses their low-focus heads
# toward the best head (`a_h <- (1 - gamma) a_h + gamma a_best`), inside generation, with the KV
# cache and no extra forward pass. Here: captions under each method, then CHAIR and POPE under one
# protocol. All methods run at the settings the tuning study chose on the dev split.

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
pd.DataFrame(rows).pivot(index=["image", "objects"], columns="method", values="caption")

# %% [markdown]
# ## What D-LEAF did
#
# The method records which layers fired, at which step, and which heads it corrected.

# %%
from dleaf_analysis.models.inputs import PromptBuilder

d = get_method("dleaf", tuned_config("dleaf", lm.weights_hash))
inputs = PromptBuilder(lm.processor).inputs(imgs[:1], ["describe the image ."])
d.generate(lm, inputs, max_new_tokens=32, do_sample=False, pad_token_id=lm.pad_token_id)
pd.DataFrame(d.log).head(10)

# %% [markdown]
# ## CHAIR and POPE, with bootstrap CIs

# %%
from dleaf_analysis.report import compare_methods
import tempfile
from pathlib import Path

methods = {m: tuned_config(m, lm.weights_hash) for m in ("greedy", "dleaf", "pai")}
out = Path(tempfile.mkdtemp())
chair = compare_methods("chair", "test", lm, methods, out, limit=30 if QUICK else 500, progress=False)
chair.pivot(index="method", columns="metric", values="value").round(2)

# %%
pope = compare_methods("pope", "test", lm, methods, out, limit=10 if QUICK else 500, progress=False)
pope[pope.metric.isin(["accuracy", "f1"])].pivot(index=["variant", "method"], columns="metric", values="value").round(2)
