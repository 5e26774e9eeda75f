"""LIAE, IAF and the uniform statistics: pure functions of attention rows (the registered
detectors built on them are in :mod:`dleaf_analysis.detectors`).

Definitions follow ``docs/method.md``.  Notation: ``a[..., h, k]`` is the post-softmax
attention of the current query over all key positions ``k`` (leading dims: steps, layers, ...),
``I`` the image-token positions, ``n = |I|``.

- image mass ``m[..., h] = sum_{i in I} a[..., h, i]``
- image-renormalised ``p[..., h, i] = a[..., h, i] / m[..., h]``
- normalised entropy ``H(p) = -sum p log p / log n``, in ``[0, 1]``
"""

from __future__ import annotations

import numpy as np
import torch

LIAE_VARIANTS = ("mean-map", "mean-entropy")
IAF_VARIANTS = ("mass", "focused-mass")
_EPS = 1e-12


def _check_variant(name: str, variants: tuple[str, ...], what: str) -> None:
    if name not in variants:
        raise ValueError(f"unknown {what} variant {name!r}; choose one of {variants}")


def normalized_entropy(p: torch.Tensor, dim: int = -1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of distributions along ``dim`` divided by ``log(size)``; ``0 log 0 = 0``.

    ``valid`` (bool, broadcastable to ``p``, last dim only): which entries exist, for rows padded
    to a common length (batches with different image-token counts); the size is then per row.
    """
    if valid is not None:
        if dim != -1:
            raise ValueError("valid= needs dim=-1")
        n = valid.sum(-1).to(p.dtype)
        plogp = torch.where((p > 0) & valid, p * torch.log(p.clamp_min(_EPS)), torch.zeros_like(p))
        logn = torch.log(n.clamp_min(2.0))
        return torch.where(n >= 2, -plogp.sum(-1) / logn, torch.zeros_like(logn))
    n = p.shape[dim]
    if n < 2:
        return torch.zeros(p.shape[:dim] + p.shape[dim + 1 :] if dim != -1 else p.shape[:-1], dtype=p.dtype)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(_EPS)), torch.zeros_like(p))
    return -plogp.sum(dim) / float(np.log(n))


def image_attention(a: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Columns of the image tokens: ``[..., H, K] -> [..., H, n]``."""
    return a[..., image_mask]


def renormalize(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Divide by the sum over the last dim; rows with zero mass become uniform (over the
    ``valid`` entries, when given)."""
    s = x.sum(-1, keepdim=True)
    if valid is None:
        uniform = torch.full_like(x, 1.0 / x.shape[-1])
    else:
        v = valid.to(x.dtype).expand_as(x)
        uniform = v / v.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.where(s > _EPS, x / s.clamp_min(_EPS), uniform)


def image_mass(a_img: torch.Tensor) -> torch.Tensor:
    """Image attention mass per head: ``[..., H, n] -> [..., H]``."""
    return a_img.sum(-1)


def head_entropy(a_img: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``H(p[..., h])`` per head: ``[..., H, n] -> [..., H]``; ``valid [..., n]`` marks the image
    columns that exist (padded batches)."""
    if valid is not None:
        valid = valid.unsqueeze(-2)
    return normalized_entropy(renormalize(a_img, valid), valid=valid)


def liae(a_img: torch.Tensor, variant: str = "mean-map", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Layer Image Attention Entropy: ``[..., H, n] -> [...]`` (e.g. ``[steps, layers]``).

    ``mean-map``: entropy of the head-averaged image attention, renormalised over I.
    ``mean-entropy``: mean over heads of the per-head entropy.
    ``valid [..., n]``: for sequences padded to a common image-token count, the columns that
    exist (padded columns must hold zeros); the entropy is normalised by each row's own count.
    """
    _check_variant(variant, LIAE_VARIANTS, "LIAE")
    if variant == "mean-map":
        return normalized_entropy(renormalize(a_img.mean(-2), valid), valid=valid)
    return head_entropy(a_img, valid).mean(-1)


def iaf(a_img: torch.Tensor, variant: str = "mass", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Image Attention Focus per head: ``[..., H, n] -> [..., H]``.

    ``mass``: image attention mass; ``focused-mass``: mass times ``1 - H(p)``.  ``valid`` as in
    :func:`liae`.
    """
    _check_variant(variant, IAF_VARIANTS, "IAF")
    m = image_mass(a_img)
    if variant == "mass":
        return m
    return m * (1 - head_entropy(a_img, valid))


# -- uniform detectors (the ones the paper argues against) -----------------------------------
def layer_image_mass(a_img: torch.Tensor) -> torch.Tensor:
    """Mean image attention mass per layer (PAI / visual-attention-ratio style): ``[..., H, n] -> [...]``."""
    return image_mass(a_img).mean(-1)


def row_entropy(a: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the whole attention row (all keys), normalised, averaged over heads: ``[..., H, K] -> [...]``."""
    if key_mask is not None:
        a = a[..., key_mask]
    return normalized_entropy(a).mean(-1)


def running_z(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each step's score against the same layer's steps before it: ``[S, L] -> [S, L]``.

    ``z[s, l] = (x[s, l] - mean(x[:s, l])) / std(x[:s, l])`` (population std, as D-LEAF's Welford
    statistics); step 0, with no history, scores 0.  D-LEAF's ``running`` rule fires exactly
    where ``z > k`` (for a positive std).
    """
    S = x.shape[0]
    x = x.float()
    csum = torch.cumsum(x, 0)
    csq = torch.cumsum(x * x, 0)
    n = torch.arange(1, S + 1, dtype=x.dtype, device=x.device).view(-1, *([1] * (x.dim() - 1)))
    mu = torch.cat([torch.zeros_like(x[:1]), csum[:-1] / n[:-1]])
    var = torch.cat([torch.zeros_like(x[:1]), (csq[:-1] / n[:-1] - (csum[:-1] / n[:-1]) ** 2).clamp_min(0)])
    z = (x - mu) / var.sqrt().clamp_min(eps)
    z[0] = 0
    return z
