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
# # 4. Theorem 1, measured: does D-LEAF's correction move the embedding the way DPO would?
#
# For a hallucination event, at a layer D-LEAF corrects: `x+` is the residual stream in the plain
# run, `xD` under D-LEAF, `x-` the preferred embedding (the counterfactual run without the cue
# object), and `g` the gradient of `log p(preferred) - log p(hallucinated)` at `x+` (proportional to
# minus the DPO gradient at `pi = pi_ref`). We compare `cos(xD - x+, g)`,
# `cos(xD - x+, x- - x+)` and `|xD - x-| / |x+ - x-|` with a null: fusing as many random heads
# toward a random head.

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
from dleaf_analysis.models import load_model
from dleaf_analysis.sources import SceneSource
from dleaf_analysis.studies.events import find_events, event_inputs
from dleaf_analysis.studies import dpo
from dleaf_analysis.interventions import DLeaf
from dleaf_analysis.settings import tuned_config

lm = load_model()
split = SceneSource.load("dev", limit=40)
events = find_events(lm, split, progress=False)
hall = events[(events.kind == "hallucinated") & events.preferred.notna() & events.cue.notna()]
cfg = DLeaf(**tuned_config("dleaf", lm.weights_hash))
ev, layers = None, []
for e in hall.to_dict(orient="records"):
    # the layers D-LEAF itself fires at the event's step: its own editor replayed over the prefix
    # (the generated ids before the event; the prompt-only inputs are event_inputs(..., prefix=False))
    layers = dpo.fired_layers(lm, event_inputs(lm, split, e, prefix=False), list(e["prefix_ids"]), cfg)
    if layers:
        ev = e
        break
assert ev is not None, "no hallucination event at which D-LEAF fires: raise the split limit"
print(ev["item"], "->", ev["token"], "(preferred:", ev["preferred"], ") corrected layers:", layers)

# %%
rows = dpo.alignment(lm, event_inputs(lm, split, ev), event_inputs(lm, split, ev, counterfactual=True),
                     ev["token_id"], int(ev["preferred_id"]), cfg, layers, n_null=5)
pd.DataFrame(rows)

# %% [markdown]
# ## Over many events, with a one-sided test

# %%
from dleaf_analysis.studies import run_study
import tempfile

res = run_study("dpo", "dev", limit=40 if QUICK else 300, out=tempfile.mkdtemp(), lm=lm, progress=False,
                max_units=6 if QUICK else None)
summary = res.tables["dpo_summary"]
summary.round(3)

# %%
t = res.tables["dpo"]
if len(t):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, stat in zip(axes, ["cos_update_grad", "cos_update_to_preferred", "distance_ratio"]):
        sns.histplot(data=t, x=stat, hue="null", stat="density", common_norm=False, element="step", ax=ax)
        ax.set_title(stat)
    plt.tight_layout(); plt.show()
else:
    print("no event with a D-LEAF firing at its step in this sample")
