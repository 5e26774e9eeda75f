"""PAI-style amplification (Liu et al. 2024), post-softmax: in a fixed layer range, every head,
every step, the current query's image probabilities are multiplied by ``1 + alpha`` and the row
is renormalised."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from dleaf_analysis import hooks
from dleaf_analysis.interventions.base import Method, RunRecord, check_layers, check_range, default_layers, register
import dleaf_analysis.interventions.fused  # noqa: F401  (registers dleaf::pai_step)
from dleaf_analysis.interventions.ops import last_row, with_last_row
from dleaf_analysis.models.adapters import ModelAdapter


@register
@dataclass
class PAI(Method):
    """Uniform amplification of image attention in a fixed layer range, every head, every step."""

    name: ClassVar[str] = "pai"
    alpha: float = 2.0
    layers: list[int] | None = None  # None: all but the first two

    def validate(self, n_layers=None, n_heads=None) -> "PAI":
        check_range("alpha", self.alpha, 0.0, 100.0)
        check_layers("layers", self.layers, n_layers)
        return self

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator[RunRecord]:
        adapter = ModelAdapter(lm.model)
        self.validate(adapter.n_layers)
        layers = set(self.layers if self.layers is not None else default_layers(adapter.n_layers))

        def edit(pattern: torch.Tensor, ctx: hooks.EditContext) -> torch.Tensor:
            if ctx.layer not in layers or self.alpha == 0:
                return pattern
            row = last_row(pattern)
            new = torch.ops.dleaf.pai_step(row, ctx.image_keys(row.shape[-1], row.device), float(self.alpha))
            return with_last_row(pattern, new)

        with hooks.attach_editor(lm.model, edit, inputs):
            yield RunRecord(self.name)
