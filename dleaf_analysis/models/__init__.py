"""Models: the embedded default LLaVA, loading of user checkpoints, adapters, generation."""

from dleaf_analysis.models.adapters import SUPPORTED_MODEL_TYPES, ModelAdapter, UnsupportedModelError
from dleaf_analysis.models.generation import answer, caption, generate
from dleaf_analysis.models.inputs import InputError, PromptBuilder
from dleaf_analysis.models.loading import LoadedModel, ModelLoadError, load_model

__all__ = [
    "SUPPORTED_MODEL_TYPES", "InputError", "LoadedModel", "ModelAdapter", "ModelLoadError", "PromptBuilder",
    "UnsupportedModelError", "answer", "caption", "generate", "load_model",
]
