"""Head detectors: IAF (Image Attention Focus; higher = a better-focused head)."""

from __future__ import annotations

from dleaf_analysis.detectors import register


@register("iaf", level="head", family="iaf", higher="better")
def iaf(cache, seed=0):
    """IAF, mass variant: the head's image attention mass."""
    return cache.iaf("mass")


@register("iaf-focused-mass", level="head", family="iaf", higher="better")
def iaf_focused_mass(cache, seed=0):
    """IAF, focused-mass variant: mass times one minus the head's image entropy."""
    return cache.iaf("focused-mass")


@register("head-image-mass-inverse", level="head", family="iaf", higher="suspect")
def head_image_mass_inverse(cache, seed=0):
    """A strawman kept for symmetry checks: high image mass called suspect."""
    return cache.iaf("mass")
