"""Runtime method settings: the configurations the tuning study chose for a model
(``data/tuned_methods.json``, written by ``dleaf tune --ship``), read by every command.

Kept apart from the tuning study itself (:mod:`dleaf_analysis.evaluation.tuning`), so that
evaluation reads settings without importing the study that produces them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from dleaf_analysis.errors import DleafError
from dleaf_analysis.paths import DATA_DIR

TUNED_FILE = DATA_DIR / "tuned_methods.json"


class TunedSettingsError(DleafError, ValueError):
    """A tuned-settings file that cannot be used for this model."""


def read_tuned(file: str | Path) -> dict:
    """A ``tuned_methods.json`` (``{"weights_hash": ..., "chosen": {method: config}}``), checked."""
    path = Path(file)
    if not path.is_file():
        raise TunedSettingsError(f"tuned settings not found: {path} (written by `dleaf tune`)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TunedSettingsError(f"{path} does not parse as JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("chosen"), dict) or not isinstance(d.get("weights_hash"), str) \
            or not all(isinstance(v, dict) for v in d["chosen"].values()):
        raise TunedSettingsError(f"{path} is not a tuned-settings file: it needs \"weights_hash\" and \"chosen\" "
                                 "({method: {setting: value}}), as `dleaf tune` writes")
    return d


def tuned_config(method: str, weights_hash: str | None = None, file: str | Path | None = None,
                 strict: bool = False) -> dict:
    """The tuned settings of a method, or {} if none: from ``file`` (the ``tuned_methods.json``
    that ``dleaf tune`` writes next to its results; default: the shipped ``data/tuned_methods.json``).

    Settings are model-specific: with ``weights_hash`` they apply only to the model they were tuned
    for.  A file given explicitly (``strict``) for another model is refused; otherwise (the shipped
    default, or ``--tuned-any``) the generic defaults are used, with a warning for an explicit file."""
    path = Path(file) if file is not None else TUNED_FILE
    if file is None and not path.is_file():
        return {}
    d = read_tuned(path)
    if weights_hash is not None and d.get("weights_hash") != weights_hash:
        if strict:
            raise TunedSettingsError(f"{path} was tuned for weights {d.get('weights_hash')}, not this model's "
                                     f"({weights_hash}); tune this model (`dleaf tune`) or pass --tuned-any to run at "
                                     "the generic defaults")
        if file is not None:
            warnings.warn(f"{path} was tuned for another model (weights {d.get('weights_hash')}); "
                          "running at the generic defaults", stacklevel=2)
        return {}
    return dict(d["chosen"].get(method, {}))
