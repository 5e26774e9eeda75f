"""Uniform fusion: D-LEAF's fusion in every candidate layer at every step (no LIAE threshold, no
localisation) -- the baseline D-LEAF is compared to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dleaf_analysis.interventions.base import ConfigError, register
from dleaf_analysis.interventions.dleaf import DLeaf


@register
@dataclass
class UniformFusion(DLeaf):
    """Baseline: D-LEAF's fusion in every candidate layer (``layers``; default: all but the first
    two, D-LEAF's own candidates) at every step, with no LIAE threshold."""

    name: ClassVar[str] = "uniform"
    threshold: str = "static"
    gamma: float = 0.25
    head_selection: str = "below-mean"
    fusion: str = "image"

    def validate(self, n_layers=None, n_heads=None) -> "UniformFusion":
        if self.threshold != "static":
            raise ConfigError("uniform fusion has no threshold; use method 'dleaf' for dynamic thresholds")
        return super().validate(n_layers, n_heads)
