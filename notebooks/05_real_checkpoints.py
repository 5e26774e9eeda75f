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
# # 5. The same analysis on a llava-hf checkpoint from a local path
#
# Everything in this suite takes a model directory. On a GPU machine with LLaVA-1.5-7B downloaded
# (`llava-hf/llava-1.5-7b-hf`), you would write `load_model("/models/llava-1.5-7b-hf",
# device="cuda", dtype="bf16")`; nothing else changes (576 image tokens, 32 layers x 32 heads).
# Here, with no weights available, we save a tiny randomly initialised model of the same class and
# image geometry (336 px, patch 14, 576 image tokens) in the llava-hf directory layout and run the
# same code on it. Its outputs are meaningless; the point is that the code path is the real one.

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
import tempfile, numpy as np
from pathlib import Path
from dleaf_analysis.models.tiny import tiny_llava15
from dleaf_analysis.models import load_model, caption

path = tiny_llava15(Path(tempfile.mkdtemp()) / "llava-1.5-tiny")
sorted(p.name for p in path.iterdir())

# %%
lm = load_model(path)                 # on a GPU: load_model(path, device="cuda", dtype="bf16")
image = (np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)
print(type(lm.model).__name__, lm.model.config.text_config.num_hidden_layers, "layers")
caption(lm, [image], max_new_tokens=8, progress=False)

# %%
from dleaf_analysis.tracing import trace_generation

cache = trace_generation(lm, image, max_new_tokens=6)
print(cache)            # 576 image tokens, as in LLaVA-1.5
cache.liae_frame().pivot(index="layer", columns="step", values="liae").round(3)

# %%
from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.models.inputs import PromptBuilder

d = DLeaf(k=0.0)        # tuned settings are model-specific: a real model needs its own tuning run (dleaf tune --model ...)
inputs = PromptBuilder(lm.processor).inputs([image], ["describe the image ."], lm.image_size)
d.generate(lm, inputs, max_new_tokens=6, do_sample=False, pad_token_id=lm.pad_token_id)
pd.DataFrame(d.log).head()

# %% [markdown]
# On a GPU machine, the same calls scale: traces keep only the current query's image columns per
# step (2.4 MB per token for LLaVA-1.5-7B in fp32) and can stream to disk (`stream_to=`).
