"""Random detectors: the chance baseline at each level (seeded)."""

from __future__ import annotations

import torch

from dleaf_analysis.detectors import register


@register("random", level="layer", family="random", fields=())
def random_layer(cache, seed=0):
    """Seeded uniform noise per (step, layer)."""
    return torch.rand(cache.n_steps, cache.n_layers, generator=torch.Generator().manual_seed(seed))


@register("random", level="head", family="random", fields=())
def random_head(cache, seed=0):
    """Seeded uniform noise per (step, layer, head) (negated: the draw the study has always used)."""
    return -torch.rand(cache.n_steps, cache.n_layers, cache.n_heads, generator=torch.Generator().manual_seed(seed))
