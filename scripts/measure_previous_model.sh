#!/usr/bin/env bash
# Measure the previous embedded model (64 image tokens, commit 66972f1) with this tree's grounding
# probes, for the comparison columns of the model card: writes data/embedded-llava/previous_model.json.
# The old model needs its own world (64 px) and code, so it runs from a git worktree of that commit
# with this tree's probe code copied in.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=66972f1
tree=$(mktemp -d)
git worktree add -f "$tree" "$OLD" >/dev/null
trap 'git worktree remove --force "$tree"' EXIT
cp dleaf_analysis/evaluation/grounding.py "$tree/dleaf_analysis/evaluation/"
.venv/bin/python - "$tree" <<'PY'
import sys
tree, here = sys.argv[1], "dleaf_analysis"
new = open(f"{here}/interventions.py").read()
block = new[new.index("# -- grounding probes"):new.index("# -- registry")]
p = f"{tree}/dleaf_analysis/interventions.py"
s = open(p).read().replace("# -- registry", block + "# -- registry", 1)
s = s.replace("HeadAblation)}", "HeadAblation, ImageAttentionProbe)}\nPROBE_KINDS = PROBE_KINDS")
open(p, "w").write(s)
r = open(f"{here}/scenes/render.py").read()
open(f"{tree}/dleaf_analysis/scenes/render.py", "a").write("\n\n" + r[r.index("def label_map("):])
PY
DLEAF_DATA_DIR="$tree/data" PYTHONPATH="$tree" .venv/bin/python - "$tree" <<'PY'
import json, sys
from dleaf_analysis.models import load_model
from dleaf_analysis.evaluation.grounding import grounding_report
tree = sys.argv[1]
card = json.load(open(f"{tree}/data/embedded-llava/model_card.json"))
lm = load_model()
metrics = {**card["metrics"], "grounding": grounding_report(lm, "dev", n_probe_images=300, progress=False)}
out = {"model_id": card["model_id"], "weights_hash": card["weights_hash"], "commit": "66972f1",
       "note": "the previous embedded model (64 image tokens, vision tower fine-tuned with the LLaVA); metrics "
               "from its own card, grounding measured by this tree's evaluation.grounding on its own dev split",
       "config": card["config"], "metrics": metrics}
json.dump(out, open("data/embedded-llava/previous_model.json", "w"), indent=1, default=str)
print("wrote data/embedded-llava/previous_model.json")
PY
