"""Counterfactual images of real photos: one object removed by filling its mask from the
surrounding pixels; every pixel outside the mask is unchanged (tested).

Fills (``FILLS``):

- ``blur`` (default): normalised convolution -- a Gaussian average of the *unmasked* pixels
  (``sigma`` = 1/16 of the image's shorter side, doubled until every masked pixel has support),
  so the hole takes the smoothed colours of its surroundings;
- ``mean``: the mean colour of a ring around the mask (width 1/32 of the shorter side).

What this controls for and what not: the object's pixels, shape and texture are gone while the
rest of the image and the text are identical; the fill is not a natural image (a blurred or flat
patch), its outline keeps the object's silhouette, and shadows, reflections and occluded parts
of other objects stay.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FILLS = ("blur", "mean")


def remove_object(image: np.ndarray, mask: np.ndarray, fill: str = "blur") -> np.ndarray:
    """``uint8 [H, W, 3]`` image with the pixels of ``mask`` (``bool [H, W]``) filled."""
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose one of {FILLS}")
    image = np.asarray(image)
    mask = np.asarray(mask, bool)
    if image.ndim != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape}")
    if not mask.any():
        return image.copy()
    if mask.all():
        raise ValueError("the mask covers the whole image: there are no surrounding pixels to fill from")
    out = image.astype(np.float64).copy()
    side = min(mask.shape)
    keep = (~mask).astype(np.float64)
    if fill == "mean":
        ring = ndimage.binary_dilation(mask, iterations=max(1, side // 32)) & ~mask
        colour = image[ring].mean(0)
        out[mask] = colour
    else:
        sigma = max(1.0, side / 16)
        while True:
            w = ndimage.gaussian_filter(keep, sigma, mode="nearest")
            if (w[mask] > 1e-6).all():
                break
            sigma *= 2
        for c in range(image.shape[2]):
            num = ndimage.gaussian_filter(out[..., c] * keep, sigma, mode="nearest")
            out[..., c][mask] = num[mask] / w[mask]
    res = image.copy()
    res[mask] = np.clip(np.rint(out[mask]), 0, 255).astype(image.dtype)
    return res


def box_mask(shape: tuple[int, int], box: list[float]) -> np.ndarray:
    """``bool [H, W]`` of a COCO box ``[x, y, w, h]`` (pixels whose centres fall inside)."""
    H, W = shape
    x, y, w, h = box
    ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5
    return ((ys >= y) & (ys <= y + h))[:, None] & ((xs >= x) & (xs <= x + w))[None, :]
