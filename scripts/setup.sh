#!/usr/bin/env bash
# Create .venv with the pinned stack (CPU torch, no torchvision) and install the package.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_CONSTRAINT="$PWD/constraints.txt"   # keeps torchvision (and CUDA torch) out, also for sub-installs
export PIP_DISABLE_PIP_VERSION_CHECK=1
# WordNet 3.0 for the COCO CHAIR lemmatiser (Debian's wordnet-base; NLTK's data cannot be downloaded here)
if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null) \
    || echo "warning: could not install wordnet-base; COCO CHAIR scoring will ask for it"
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dleaf-installed
want=$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q -r requirements.txt -c constraints.txt
  .venv/bin/pip install -q --no-deps -e .
  .venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import dleaf_analysis, torch, nnsight, transformer_lens; print('dleaf-analysis environment ready: torch', torch.__version__)"
