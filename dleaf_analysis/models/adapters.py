"""Per-architecture adapters: where the language-model layers are, which input positions
hold image tokens.  Supported: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, InstructBLIP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dleaf_analysis.errors import DleafError

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
}


class UnsupportedModelError(DleafError, TypeError):
    pass


@dataclass
class ModelAdapter:
    """What the analysis needs to know about one model object."""

    model: nn.Module

    def __post_init__(self) -> None:
        mt = getattr(self.model.config, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} (model_type {mt!r}) is not supported; supported classes: "
                + ", ".join(sorted(SUPPORTED_MODEL_TYPES.values()))
            )
        self.model_type: str = mt

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (the module whose ``.layers`` are the LM layers)."""
        inner = getattr(self.model, "model", None)
        lm = getattr(inner, "language_model", None) if inner is not None else None
        if lm is None:
            lm = getattr(self.model, "language_model", None)
        if lm is not None and not hasattr(lm, "layers") and hasattr(lm, "model"):
            lm = lm.model
        if lm is None or not hasattr(lm, "layers"):
            raise UnsupportedModelError(f"cannot find the language-model layers of {type(self.model).__name__}")
        return lm

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        tc = self.text_config
        return int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        for key in ("image_token_id", "image_token_index"):
            v = getattr(cfg, key, None)
            if v is not None:
                return int(v)
        raise UnsupportedModelError(f"{type(self.model).__name__} config names no image token id")

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B, T]``: which prompt positions are image tokens."""
        return input_ids == self.image_token_id
