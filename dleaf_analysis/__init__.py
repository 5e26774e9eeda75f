"""dleaf-analysis: mechanistic interpretability of object hallucination in LLaVA-style models."""

import os as _os

# Nothing in this package may touch a model hub (no network here; lookups hang ~28 s).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
