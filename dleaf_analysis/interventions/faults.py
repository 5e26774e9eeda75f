"""Planted attention faults: damage of known place, strength and timing, for calibration and the
leverage map (:mod:`dleaf_analysis.studies.calibration`, :mod:`dleaf_analysis.studies.leverage`).

A *fault* acts through the hook point while the model decodes: in one layer, on a set of heads,
on a fraction of decoding steps (drawn per image from a seed, or ``intermittent``: each step
independently with probability ``step_fraction``), each head's attention row of the current
query is damaged with a strength ``s`` in ``[0, 1]``:

- ``diffuse``: its image columns move toward a uniform distribution of the same image mass,
  ``a_I <- (1 - s) a_I + s m / n`` (where it looks inside the image is lost; how much is kept);
- ``drain``: image mass is moved to the text keys, ``a_I <- (1 - s) a_I`` and the text columns
  are scaled up so that the row still sums to 1 (how much it looks is lost).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dleaf_analysis import hooks
from dleaf_analysis.interventions.dleaf import DLeaf
from dleaf_analysis.interventions.ops import fuse_heads, last_row
from dleaf_analysis.seeding import derive_seed

FAULT_KINDS = ("diffuse", "drain")


@dataclass(frozen=True)
class Fault:
    """A planted attention fault (see the module doc); ``heads`` may be every head (the leverage map)."""

    kind: str
    layer: int
    heads: tuple[int, ...]
    strength: float = 1.0
    step_fraction: float = 1.0
    seed: int = 0

    def validate(self, n_layers: int, n_heads: int, allow_all_heads: bool = False) -> "Fault":
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; choose one of {FAULT_KINDS}")
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"fault layer {self.layer} out of range; the model has layers 0..{n_layers - 1}")
        proper = len(self.heads) < n_heads or allow_all_heads
        if not self.heads or any(not 0 <= h < n_heads for h in self.heads) or not proper:
            what = "a non-empty subset" if allow_all_heads else "a non-empty proper subset"
            raise ValueError(f"fault heads {self.heads} must be {what} of 0..{n_heads - 1}")
        if not (0 < self.strength <= 1 and 0 < self.step_fraction <= 1):
            raise ValueError("fault strength and step_fraction must be in (0, 1]")
        return self

    @property
    def key(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}, sort_keys=True)

    def active_steps(self, item: int, n_steps: int = 512) -> np.ndarray:
        """``bool [n_steps]``: the decoding steps at which the fault acts on image ``item``."""
        rng = np.random.default_rng(derive_seed(self.seed, self.key, item))
        return rng.random(n_steps) < self.step_fraction


def damage(row: torch.Tensor, img: torch.Tensor, kind: str, strength: float) -> torch.Tensor:
    """The damaged attention row: ``row [B, H, K]``, ``img [B, K]`` bool -> ``[B, H, K]``."""
    imgf = img[:, None, :].to(row.dtype)
    mass = (row * imgf).sum(-1, keepdim=True)  # [B, H, 1]
    n = imgf.sum(-1, keepdim=True).clamp_min(1)
    if kind == "diffuse":
        new_img = (1 - strength) * row + strength * mass / n
        return torch.where(img[:, None, :], new_img, row)
    text_mass = (row * (1 - imgf)).sum(-1, keepdim=True).clamp_min(1e-12)
    scale = 1 + strength * mass / text_mass
    return torch.where(img[:, None, :], (1 - strength) * row, row * scale)


class FaultEditor:
    """Pattern editor that plants ``fault`` during decoding of a batch of ``items`` (image ids).

    With ``oracle_cfg``, D-LEAF's fusion (its gamma and fusion variant) is applied right after the
    damage, exactly at the faulted steps and heads, toward the best intact head.  ``every_call``:
    act on every call (teacher-forced analyses), not per decoding step.  The image key positions
    come from the editor's context (``attach_editor(..., inputs)``); ``expand``: the inputs hold one
    sequence repeated in a batch of copies (causal maps).
    """

    def __init__(self, fault: Fault, items: list[int], oracle_cfg: DLeaf | None = None, every_call: bool = False,
                 expand: bool = False) -> None:
        self.fault = fault
        self.active = torch.from_numpy(np.stack([fault.active_steps(i) for i in items]))  # [B, S]
        self.oracle_cfg, self.every_call, self.expand = oracle_cfg, every_call, expand

    def __call__(self, pattern: torch.Tensor, ctx: hooks.EditContext) -> torch.Tensor:
        f = self.fault
        if ctx.layer != f.layer:
            return pattern
        B, H, _, K = pattern.shape
        step = min(ctx.step, self.active.shape[1] - 1)
        act = torch.ones(B, dtype=torch.bool) if self.every_call else self.active[:, step]
        act = act.to(pattern.device)
        if act.shape[0] != B:
            act = act[:1].expand(B)
        head_mask = torch.zeros(H, dtype=torch.bool, device=pattern.device)
        head_mask[list(f.heads)] = True
        sel = act[:, None] & head_mask[None, :]  # [B, H]
        row = last_row(pattern)
        img = ctx.image_keys(K, pattern.device)
        if img.shape[0] != B:  # batched copies of one input (causal maps)
            img = img[:1].expand(B, -1)
        new = torch.where(sel[..., None], damage(row.float(), img, f.kind, f.strength).to(row.dtype), row)
        if self.oracle_cfg is not None:
            iaf = (new.float() * img[:, None, :]).sum(-1).masked_fill(head_mask[None, :], -1.0)  # intact heads only
            key_img = img if self.oracle_cfg.fusion == "image" else None
            new = fuse_heads(new, sel, iaf.argmax(-1), self.oracle_cfg.gamma, key_img)
        pattern = pattern.clone()
        pattern[:, :, -1, :] = new
        return pattern
