"""What the analysis needs to know about one model object, read from its registered family
(:mod:`dleaf_analysis.models.families`): where the language-model layers are, their attention
and output-projection modules, which input positions hold image tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dleaf_analysis.models.families import FAMILIES, Family, UnsupportedModelError, family_for

SUPPORTED_MODEL_TYPES: dict[str, str] = {k: f.hf_class for k, f in FAMILIES.items()}

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelAdapter", "UnsupportedModelError"]


@dataclass
class ModelAdapter:
    """The family-specific facts about one model object."""

    model: nn.Module

    def __post_init__(self) -> None:
        self.family: Family = family_for(getattr(self.model.config, "model_type", None))
        self.model_type: str = self.family.model_type

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (the module whose ``.layers`` are the LM layers)."""
        return self.family.decoder_of(self.model)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.language_model, self.family.layers)

    def attention(self, layer: int) -> nn.Module:
        """Layer ``layer``'s attention module (where the hook point sits)."""
        return getattr(self.layers[layer], self.family.attention)

    def output_projection(self, layer: int) -> nn.Module:
        """Layer ``layer``'s attention output projection (its input: the heads' outputs ``[B, T, H * d]``)."""
        return getattr(self.attention(layer), self.family.output_projection)

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
        for key in self.family.image_token_keys:
            v = getattr(cfg, key, None)
            if v is not None:
                return int(v)
        raise UnsupportedModelError(f"{type(self.model).__name__} config names no image token id")

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B, T]``: which prompt positions are image tokens."""
        return input_ids == self.image_token_id
