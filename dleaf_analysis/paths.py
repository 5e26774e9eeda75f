"""Where the package finds its shipped data (``data/`` at the repository root)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("DLEAF_DATA_DIR", REPO_ROOT / "data"))
EMBEDDED_MODEL_DIR = DATA_DIR / "embedded-llava"
FIGURES_DIR = REPO_ROOT / "figures"
