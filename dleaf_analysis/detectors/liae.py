"""The paper's layer detectors: LIAE (Layer Image Attention Entropy) and its running z-score."""

from __future__ import annotations

from dleaf_analysis import diagnostics as D
from dleaf_analysis.detectors import register


@register("liae", level="layer", family="liae")
def liae(cache, seed=0):
    """LIAE, mean-map variant: entropy of the head-averaged image attention (high = not looking)."""
    return cache.liae("mean-map")


@register("liae-z", level="layer", family="liae")
def liae_z(cache, seed=0):
    """LIAE against the layer's own running mean and std over the steps so far: the statistic D-LEAF's
    running threshold compares (it fires where this exceeds k)."""
    return D.running_z(cache.liae("mean-map"))


@register("liae-mean-entropy", level="layer", family="liae")
def liae_mean_entropy(cache, seed=0):
    """LIAE, mean-entropy variant: the mean over heads of each head's image-attention entropy."""
    return cache.liae("mean-entropy")
