"""Runtime method settings: the configurations the tuning study chose for a model
(``data/tuned_methods.json``, written by ``dleaf tune --ship``), read by every command.

Kept apart from the tuning study itself (:mod:`dleaf_analysis.evaluation.tuning`), so that
evaluation reads settings without importing the study that produces them.
"""

from __future__ import annotations

import json

from dleaf_analysis.paths import DATA_DIR

TUNED_FILE = DATA_DIR / "tuned_methods.json"


def tuned_config(method: str, weights_hash: str | None = None) -> dict:
    """The shipped tuned settings of a method, or {} if none.

    With ``weights_hash``: only if the settings were tuned for that model (they are
    model-specific; other models get the configs' generic defaults)."""
    if not TUNED_FILE.is_file():
        return {}
    d = json.loads(TUNED_FILE.read_text())
    if weights_hash is not None and d.get("weights_hash") != weights_hash:
        return {}
    return d["chosen"].get(method, {})
