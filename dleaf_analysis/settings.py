"""Runtime method settings: the configurations the tuning study chose for a model
(``data/tuned_methods.json``, written by ``dleaf tune --ship``), read by every command.

Kept apart from the tuning study itself (:mod:`dleaf_analysis.evaluation.tuning`), so that
evaluation reads settings without importing the study that produces them.
"""

from __future__ import annotations

import json
from pathlib import Path

from dleaf_analysis.paths import DATA_DIR

TUNED_FILE = DATA_DIR / "tuned_methods.json"


def tuned_config(method: str, weights_hash: str | None = None, file: str | Path | None = None) -> dict:
    """The tuned settings of a method, or {} if none: from ``file`` (the ``tuned_methods.json``
    that ``dleaf tune`` writes next to its results; default: the shipped ``data/tuned_methods.json``).

    With ``weights_hash``: only if the settings were tuned for that model (they are
    model-specific; other models get the configs' generic defaults)."""
    path = Path(file) if file is not None else TUNED_FILE
    if file is not None and not path.is_file():
        raise FileNotFoundError(f"tuned settings not found: {path} (written by `dleaf tune`)")
    if not path.is_file():
        return {}
    d = json.loads(path.read_text())
    if weights_hash is not None and d.get("weights_hash") != weights_hash:
        return {}
    return d["chosen"].get(method, {})
