"""The uniform layer detectors the paper argues against (image mass, row entropy, every layer)."""

from __future__ import annotations

import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis.detectors import register


@register("image-mass", level="layer", family="uniform")
def image_mass(cache, seed=0):
    """Minus the mean image attention mass (low mass = suspect; PAI / visual-attention-ratio style)."""
    return -D.layer_image_mass(cache.image_attn.float())


@register("image-mass-z", level="layer", family="uniform")
def image_mass_z(cache, seed=0):
    """The running z-score of ``image-mass``."""
    return D.running_z(-D.layer_image_mass(cache.image_attn.float()))


@register("row-entropy", level="layer", family="uniform", fields=("row_entropy",))
def row_entropy(cache, seed=0):
    """Entropy of the whole attention row (all keys), head-averaged."""
    return cache.row_entropy.float().mean(-1)


@register("all-layers", level="layer", family="uniform", fields=())
def all_layers(cache, seed=0):
    """Every layer equally suspect (no localisation)."""
    return torch.ones(cache.n_steps, cache.n_layers)
