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

cache = trace_generation(lm, image, max_new_tokens=6, generate_kwargs={"min_new_tokens": 6})
print(cache)            # 576 image tokens, as in LLaVA-1.5
cache.liae_frame().pivot(index="layer", columns="step", values="liae").round(3)

# %%
from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.models.inputs import PromptBuilder

d = DLeaf(k=0.0)        # tuned settings are model-specific: a real model needs its own tuning run (dleaf tune --model ...)
inputs = PromptBuilder(lm.processor).inputs([image], ["describe the image ."], lm.image_size)
ids, record = d.decode(lm, inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=lm.pad_token_id)
pd.DataFrame(record.log).head()

# %% [markdown]
# On a GPU machine, the same calls scale: traces keep only the current query's image columns per
# step (2.4 MB per token for LLaVA-1.5-7B in fp32) and can stream to disk (`stream_to=`).

# %% [markdown]
# ## Studies on COCO images
#
# The studies, tuning, calibration and figures take an *image source*: the scene world's splits, COCO
# (`CocoSource`: an images folder, the 2014 instances annotations, an optional image-id list) or your
# own annotated folder (`JsonlSource`). On a GPU machine with COCO val2014:
# `CocoSource("/data/coco/val2014", "/data/coco/annotations/instances_val2014.json", image_ids="ids.txt")`.
# Here: the small fake COCO the tests use, and a tiny LLaVA-1.5-shaped model with a sub-word
# tokenizer, trained for a few seconds to answer every image with one caption that mentions COCO
# objects. Mentions are found in the generated ids with CHAIR's matcher; `step..span_end` is the
# mention's token span (several sub-tokens), `token_id` its first sub-token.

# %%
from dleaf_analysis.paths import EXAMPLES_DIR
from dleaf_analysis.models.tiny import tiny_llava15_subword_dir
from dleaf_analysis.sources import CocoSource
from dleaf_analysis.studies.events import find_events

fake = EXAMPLES_DIR / "fake_coco"  # shipped with the package (6 images)
coco = CocoSource(fake / "val2014", fake / "instances_fake2014.json", image_ids=fake / "image_ids.txt")
sw = load_model(tiny_llava15_subword_dir(Path(tempfile.mkdtemp()) / "llava-1.5-subword"))
events = find_events(sw, coco, progress=False)
print(sw.tokenizer.convert_ids_to_tokens(list(events.span_ids.iloc[2])), "->", events.word.iloc[2])
events[["item", "kind", "token", "word", "step", "span_end", "preferred", "cue", "margin"]].head(8)

# %% [markdown]
# The counterfactual removes the cue object by filling its segmentation mask from the surrounding
# pixels (`fill="blur"`, or `"mean"`); every other pixel is unchanged.

# %%
ev = events[events.cue.notna()].iloc[0]
fig, axes = plt.subplots(1, 2, figsize=(7, 2.6))
axes[0].imshow(coco.image(int(ev.image)))
axes[0].set_title(f"image {ev['item']}", fontsize=9)
axes[1].imshow(coco.counterfactual(int(ev.image), ev.cue))
axes[1].set_title(f"{ev.cue} removed (counterfactual)", fontsize=9)
for a in axes:
    a.set_axis_off()

# %%
from dleaf_analysis.studies import run_study

res = run_study("localization", coco, limit=None, out=tempfile.mkdtemp(), lm=sw, progress=False, batch_size=2)
res.tables["localization_summary"].query("level == 'layer' and metric == 'spearman'").round(3).head(10)

# %% [markdown]
# From the command line, the same on LLaVA-1.5-7B (see the README's GPU guide):
# `dleaf study localization --model /models/llava-1.5-7b-hf --device cuda --dtype bf16
# --coco-images /data/coco/val2014 --coco-annotations /data/coco/annotations/instances_val2014.json
# --image-ids ids.txt --batch-size 8`.
