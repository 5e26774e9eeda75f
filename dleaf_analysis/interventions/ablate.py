"""Head ablation: zero or mean ablation of chosen heads (their slice of ``o_proj``'s input)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from dleaf_analysis import lens
from dleaf_analysis.interventions.base import ConfigError, Method, RunRecord, register
from dleaf_analysis.models.adapters import ModelAdapter


@register
@dataclass
class HeadAblation(Method):
    """Zero or mean ablation of heads ``[(layer, head), ...]``: their slice of ``o_proj``'s input
    is set to zero or to its mean over the prompt positions (``mean`` over the current call)."""

    name: ClassVar[str] = "ablate"
    heads: list[tuple[int, int]] = field(default_factory=list)
    mode: str = "zero"

    def validate(self, n_layers=None, n_heads=None) -> "HeadAblation":
        if self.mode not in ("zero", "mean"):
            raise ConfigError(f"unknown ablation mode {self.mode!r}; choose one of ('zero', 'mean')")
        for l, h in self.heads:
            if n_layers is not None and not (0 <= l < n_layers):
                raise ConfigError(f"layer {l} out of range; the model has layers 0..{n_layers - 1}")
            if n_heads is not None and not (0 <= h < n_heads):
                raise ConfigError(f"head {h} out of range; the model has heads 0..{n_heads - 1}")
        return self

    @contextmanager
    def attach(self, lm, inputs: dict) -> Iterator[RunRecord]:
        adapter = ModelAdapter(lm.model)
        self.validate(adapter.n_layers, adapter.n_heads)
        by_layer: dict[int, list[int]] = {}
        for l, h in self.heads:
            by_layer.setdefault(int(l), []).append(int(h))
        means: dict[int, torch.Tensor] = {}

        def make(l: int, hs: list[int]):
            def edit(z):  # [B, T, H, d]
                z = z.clone()
                for h in hs:
                    if self.mode == "zero":
                        z[..., h, :] = 0
                    else:
                        if l not in means or z.shape[1] > 1:  # the prefill defines the mean
                            means[l] = z.mean(1, keepdim=True)
                        z[..., h, :] = means[l][..., h, :]
                return z
            return edit

        with ExitStack() as st:
            for l, hs in by_layer.items():
                st.enter_context(lens.hook(lm.model, f"blocks.{l}.attn.hook_z", make(l, hs)))
            yield RunRecord(self.name)
