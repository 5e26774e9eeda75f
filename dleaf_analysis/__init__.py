"""dleaf-analysis: mechanistic interpretability of object hallucination in LLaVA-style models.

The main entry points are importable from the top level (loaded on first use, so that
``import dleaf_analysis`` stays light)::

    from dleaf_analysis import load_model, trace_forward, DLeaf, evaluate, run_study
"""

from __future__ import annotations

import importlib as _importlib
import os as _os

# Nothing in this package may touch a model hub (no network here; lookups hang ~28 s).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "dleaf_analysis.models.loading",
    "LoadedModel": "dleaf_analysis.models.loading",
    "trace_forward": "dleaf_analysis.tracing",
    "trace_generation": "dleaf_analysis.tracing",
    "liae": "dleaf_analysis.diagnostics",
    "iaf": "dleaf_analysis.diagnostics",
    "diagnose": "dleaf_analysis.detectors",
    "as_source": "dleaf_analysis.sources",
    "DLeaf": "dleaf_analysis.interventions",
    "UniformFusion": "dleaf_analysis.interventions",
    "PAI": "dleaf_analysis.interventions",
    "VCD": "dleaf_analysis.interventions",
    "Greedy": "dleaf_analysis.interventions",
    "HeadAblation": "dleaf_analysis.interventions",
    "get_method": "dleaf_analysis.interventions",
    "evaluate": "dleaf_analysis.evaluation.runner",
    "run_study": "dleaf_analysis.studies",
    "load_split": "dleaf_analysis.scenes",
    "run_with_cache": "dleaf_analysis.lens",
    "hook": "dleaf_analysis.lens",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dleaf_analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
