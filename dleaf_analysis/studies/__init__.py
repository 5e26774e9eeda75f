"""The studies, one file each, behind one protocol (:mod:`dleaf_analysis.studies.base`): every
module of this package is imported with it, so that each registers itself.

- ``ablation``, ``patching``, ``localization``: causal maps of hallucination events and whether
  the detectors localise them (:mod:`.ablation`, :mod:`.patching`, :mod:`.localization`);
- ``dpo``: the gradient-alignment check of the paper's Theorem 1 (:mod:`.dpo`);
- ``calibration``: planted faults of known place, strength and timing (:mod:`.calibration`);
- ``leverage``: which layers the model reads the image in (:mod:`.leverage`).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from dleaf_analysis.studies.base import (STUDIES, NoEventsError, Study, StudyResult, get_study, load_study,
                                         merge_study, register, run_study)

for _m in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    _importlib.import_module(f"{__name__}.{_m}")

__all__ = ["STUDIES", "NoEventsError", "Study", "StudyResult", "get_study", "load_study", "merge_study", "register",
           "run_study"]
