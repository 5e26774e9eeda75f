"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP tower, a projector, a Llama (or Mistral,
Qwen2, Gemma 2) decoder.  The embedded model is one."""

from __future__ import annotations

from dleaf_analysis.models.families import Family, register
from dleaf_analysis.models.tiny import tiny_llava15


def _tiny_model(seed: int = 0):
    """A tiny random LLaVA-1.5 with one image's inputs."""
    import numpy as np

    from dleaf_analysis.models.inputs import PromptBuilder

    model, processor = tiny_llava15(seed=seed)
    img = np.zeros((336, 336, 3), np.uint8)
    return model, dict(PromptBuilder(processor).inputs([img], ["describe the image ."], 336))


FAMILY = register(Family(
    model_type="llava", hf_class="LlavaForConditionalGeneration", decoder=("model.language_model",),
    tiny_model=_tiny_model, tiny_dir=tiny_llava15,
))
