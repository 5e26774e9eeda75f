"""Tensor operations the interventions share (one floor below the methods): image key columns of
attention rows and D-LEAF's head fusion.  Shapes: ``row [B, H, K]`` (one query row per head),
``img [B, K]`` (image key positions)."""

from __future__ import annotations

import torch

from dleaf_analysis.hooks import image_positions
from dleaf_analysis.models.adapters import ModelAdapter

FUSIONS = ("row", "image")


def image_key_mask(inputs: dict, adapter: ModelAdapter, K: int) -> torch.Tensor:
    """``[B, K]`` boolean: image-token key positions (prompt only; generated keys are text)."""
    m = adapter.image_mask(inputs["input_ids"])
    if K > m.shape[1]:
        m = torch.cat([m, torch.zeros(m.shape[0], K - m.shape[1], dtype=torch.bool, device=m.device)], 1)
    return m[:, :K]


def image_columns(row: torch.Tensor, img: torch.Tensor, with_valid: bool = False):
    """``row [B, H, K]``, ``img [B, K]`` -> image columns ``[B, H, n]`` (zeros where a sequence has
    fewer image tokens than the largest count); with ``with_valid`` also ``valid [B, n]``."""
    pos, valid = image_positions(img)
    cols = row.gather(-1, pos.unsqueeze(1).expand(-1, row.shape[1], -1)) * valid.unsqueeze(1).to(row.dtype)
    return (cols, valid) if with_valid else cols


def fuse_heads(row: torch.Tensor, fuse: torch.Tensor, best: torch.Tensor, gamma: float,
               image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixed attention (paper Eq. 4) on one query row per head.

    ``row [B, H, K]``; ``fuse [B, H]`` bool (heads to correct); ``best [B]`` (index of the best
    head).  Returns ``a_h <- (1 - gamma) a_h + gamma a_best`` for the selected heads
    (``row`` fusion).  With ``image_mask [B, K]`` (``image`` fusion) only the image
    columns are mixed, the text columns are kept, and the row is renormalised to sum to 1.
    """
    a_best = row.gather(1, best.view(-1, 1, 1).expand(-1, 1, row.shape[-1]))  # [B, 1, K]
    mixed = (1 - gamma) * row + gamma * a_best
    if image_mask is not None:
        mixed = torch.where(image_mask[:, None, :].to(row.device), mixed, row)
        mixed = mixed / mixed.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.where(fuse.unsqueeze(-1), mixed, row)


def last_row(pattern: torch.Tensor) -> torch.Tensor:
    """The current query's row of every head: ``[B, H, Q, K] -> [B, H, K]``."""
    return pattern[:, :, -1, :]


def with_last_row(pattern: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``pattern`` with its last query row replaced by ``row [B, H, K]`` (a copy when autograd
    is recording, so that its saved tensors stay intact; in place otherwise)."""
    if torch.is_grad_enabled():
        pattern = pattern.clone()
    pattern[:, :, -1, :] = row.to(pattern.dtype)
    return pattern
