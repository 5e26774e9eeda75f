"""Where the package finds its shipped data.

In a checkout that is ``data/`` at the repository root; in an installed wheel the same files ship
as ``dleaf_analysis/data`` (pyproject maps one onto the other).  ``DLEAF_DATA_DIR`` overrides both.
Figures regenerated for the README go to the checkout's ``figures/``; outside a checkout the
default is ``./figures``.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "data").is_dir()
_default_data = REPO_ROOT / "data" if IN_CHECKOUT else PACKAGE_DIR / "data"
DATA_DIR = Path(os.environ.get("DLEAF_DATA_DIR", _default_data))
EMBEDDED_MODEL_DIR = DATA_DIR / "embedded-llava"
EXAMPLES_DIR = DATA_DIR / "examples"  # small example inputs (a fake COCO) for the notebooks
FIGURES_DIR = REPO_ROOT / "figures" if IN_CHECKOUT else Path("figures")
