"""Model families: everything the analysis needs to know about one transformers VLM class, one
declarative file each, registered by ``model_type``.

A :class:`Family` names where the decoder layers are (``decoder`` paths), the attention and
output-projection submodules of a layer (the hook point and ``hook_z`` / ``hook_result`` read them
there), how key/value heads are grouped (GQA: through the attention module's
``num_key_value_groups``, which the hook point's eager attention honours), how to load its
processor from a local directory, the plain prompt format of checkpoints without a chat template,
and its tiny random builders (tests: a model with matching inputs, and a saved directory in the
released layout).  :class:`~dleaf_analysis.models.adapters.ModelAdapter`, :mod:`dleaf_analysis.hooks`,
:mod:`dleaf_analysis.lens` and :func:`~dleaf_analysis.models.loading.load_model` read the family;
supporting a new class is one new file here (``docs/extending.md``).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dleaf_analysis.errors import DleafError


class UnsupportedModelError(DleafError, TypeError):
    pass


@dataclass(frozen=True)
class Family:
    """One supported model class (see the module doc)."""

    model_type: str
    hf_class: str
    decoder: tuple[str, ...] = ("model.language_model",)  # dotted paths from the model to the decoder stack
    layers: str = "layers"  # the decoder stack's list of layers
    attention: str = "self_attn"  # a layer's attention module (the hook point goes inside it)
    output_projection: str = "o_proj"  # the attention module's output projection (input: the heads' outputs)
    gqa: str = "num_key_value_groups"  # the attention module's attribute with the number of query heads per KV head
    image_token_keys: tuple[str, ...] = ("image_token_id", "image_token_index")
    plain_prompt: str | None = None  # prompt format ({prompt}) for checkpoints without a chat template
    load_processor: Callable[[Path], Any] | None = None  # None: AutoProcessor.from_pretrained
    tiny_model: Callable[..., tuple] | None = None  # (seed=0) -> (model, inputs), from a config
    tiny_dir: Callable[..., Path] | None = None  # (out_dir, seed=0) -> a saved directory, the released layout
    notes: str = ""

    def decoder_of(self, model) -> Any:
        """The decoder stack (the module holding ``.layers``) of ``model``."""
        for path in self.decoder:
            mod = model
            for part in path.split("."):
                mod = getattr(mod, part, None)
                if mod is None:
                    break
            if mod is not None and hasattr(mod, self.layers):
                return mod
        raise UnsupportedModelError(f"cannot find the language-model layers of {type(model).__name__} "
                                    f"(tried {list(self.decoder)})")


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.model_type in FAMILIES and FAMILIES[family.model_type] != family:
        raise ValueError(f"model type {family.model_type!r} is already registered")
    FAMILIES[family.model_type] = family
    return family


def family_for(model_type: str | None) -> Family:
    """The registered family of a ``model_type`` (a clear error listing the supported classes)."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported classes: "
                                    + ", ".join(sorted(f.hf_class for f in FAMILIES.values())))
    return FAMILIES[model_type]


_SHIPPED = ("llava", "llava_next", "qwen2_vl", "instructblip")
for _m in list(_SHIPPED) + sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SHIPPED):
    importlib.import_module(f"{__name__}.{_m}")  # every family file registers itself
