"""Grounding probes: image attention made uniform, shuffled or single-token at the same mass."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from dleaf_analysis import hooks
from dleaf_analysis.interventions.base import ConfigError, Method, RunRecord, register


PROBE_KINDS = ("uniform", "shuffle", "single")


@register
@dataclass
class ImageAttentionProbe(Method):
    """Destroys *where* attention falls inside the image while keeping *how much* falls there.

    In every layer and head, for every text query row (prompt text and generated tokens), the
    row's image columns are replaced by: ``uniform`` (the same mass spread evenly), ``shuffle``
    (the same values permuted across image positions) or ``single`` (all of the mass on one
    image position).  Permutations and positions are drawn per call from ``seed``.  On a
    grounded model recall must collapse; it is the model card's acceptance probe.
    """

    name: ClassVar[str] = "probe"
    kind: str = "uniform"
    seed: int = 0

    def validate(self, n_layers=None, n_heads=None) -> "ImageAttentionProbe":
        if self.kind not in PROBE_KINDS:
            raise ConfigError(f"unknown probe kind {self.kind!r}; choose one of {PROBE_KINDS}")
        return self

    @property
    def prompt_rows(self) -> str:
        return "all"  # edits every text query row of the prompt

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator[RunRecord]:
        self.validate()
        gen = torch.Generator().manual_seed(self.seed)

        def edit(pattern: torch.Tensor, ctx: hooks.EditContext) -> torch.Tensor:
            B, H, Q, K = pattern.shape
            img = ctx.image_keys(K, pattern.device)  # [B, K]
            q_text = ~img[:, K - Q:]  # [B, Q]: query rows that are not image tokens
            sel = img[:, None, None, :] & q_text[:, None, :, None]  # [B, 1, Q, K]
            mass = (pattern * img[:, None, None, :]).sum(-1, keepdim=True)  # [B, H, Q, 1]
            n = img.sum(-1).view(B, 1, 1, 1).clamp(min=1)
            if self.kind == "uniform":
                new = (mass / n).expand_as(pattern)
            else:
                new = torch.zeros_like(pattern)
                for b in range(B):
                    pos = img[b].nonzero().flatten()
                    if self.kind == "shuffle":
                        perm = pos[torch.randperm(len(pos), generator=gen).to(pos.device)]
                        new[b][..., pos] = pattern[b][..., perm]
                    else:
                        j = pos[torch.randint(len(pos), (1,), generator=gen).to(pos.device)]
                        new[b][..., j] = mass[b]
            return torch.where(sel, new, pattern)

        with hooks.attach_editor(lm.model, edit, inputs):
            yield RunRecord(self.name)
