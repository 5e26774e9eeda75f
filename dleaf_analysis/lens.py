"""Named hook points over any supported model, TransformerLens style.

Names (``l`` = language-model layer):

- ``blocks.{l}.attn.hook_pattern``: post-softmax attention ``[B, H, Q, K]`` (the hook point of
  :mod:`dleaf_analysis.hooks`);
- ``blocks.{l}.attn.hook_z``: each head's output before ``o_proj`` ``[B, T, H, d_head]``;
- ``blocks.{l}.attn.hook_result``: the attention block's output after ``o_proj`` ``[B, T, d_model]``;
- ``blocks.{l}.hook_resid_post``: the residual stream after the layer ``[B, T, d_model]``.

``hook(model, name, fn)`` is the one hook context manager: ``fn(value) -> value | None`` reads
or replaces the value at that point (``None`` keeps it).  ``run_with_cache`` returns an
:class:`ActivationCache`; ``patch`` runs one generic activation-patching sweep, with the thin
partials ``patch_head``, ``patch_layer`` and ``patch_position``.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from dleaf_analysis import hooks
from dleaf_analysis.models.adapters import ModelAdapter

POINTS = ("attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_resid_post")
_NAME = re.compile(r"^blocks\.(\d+)\.(attn\.hook_pattern|attn\.hook_z|attn\.hook_result|hook_resid_post)$")


def hook_names(model) -> list[str]:
    """Every hook point name of ``model``, layer by layer."""
    return [f"blocks.{l}.{p}" for l in range(ModelAdapter(model).n_layers) for p in POINTS]


def _parse(model, name: str) -> tuple[int, str]:
    m = _NAME.match(name)
    n_layers = ModelAdapter(model).n_layers
    if m is None or int(m.group(1)) >= n_layers:
        raise ValueError(f"unknown hook point {name!r}; names look like 'blocks.<0..{n_layers - 1}>.<point>' "
                         f"with point one of {POINTS}")
    return int(m.group(1)), m.group(2)


@contextmanager
def hook(model, name: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn`` on the value at hook point ``name`` for the block's duration; a returned tensor
    replaces the value (same shape)."""
    layer, point = _parse(model, name)
    ad = ModelAdapter(model)
    block = ad.layers[layer]
    if point == "attn.hook_pattern":
        pat = hooks.install(model)[layer]
        handle = pat.register_forward_hook(lambda m, i, o: fn(o))
    elif point == "attn.hook_z":
        H, d = ad.n_heads, ad.head_dim

        def pre(m, args):
            x = args[0]
            z = x.view(*x.shape[:-1], H, d)
            new = fn(z)
            return None if new is None else (new.reshape(x.shape),) + tuple(args[1:])
        handle = block.self_attn.o_proj.register_forward_pre_hook(pre)
    elif point == "attn.hook_result":
        handle = block.self_attn.o_proj.register_forward_hook(lambda m, i, o: fn(o))
    else:  # hook_resid_post: the decoder layer's output (a tensor, or a tuple whose first item it is)
        def post(m, i, o):
            h = o[0] if isinstance(o, tuple) else o
            new = fn(h)
            if new is None:
                return None
            return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new
        handle = block.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class ActivationCache:
    """Values of named hook points from one forward pass, with the layout of the inputs."""

    values: dict[str, torch.Tensor]
    n_layers: int
    n_heads: int
    image_positions: list[list[int]] = field(default_factory=list)  # per sequence

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.values:
            raise KeyError(f"{name!r} was not cached; cached: {sorted(self.values)[:6]}...")
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def keys(self):
        return self.values.keys()

    def stack(self, point: str) -> torch.Tensor:
        """One point over every layer: ``[L, ...]``."""
        return torch.stack([self[f"blocks.{l}.{point}"] for l in range(self.n_layers)])


def run_with_cache(lm, inputs: dict, names: list[str] | Callable[[str], bool] | None = None,
                   ) -> tuple[torch.Tensor, ActivationCache]:
    """One forward pass; returns the logits ``[B, T, V]`` and the cached hook points (``names``: a
    list, a predicate on names, or None for every point)."""
    model = lm.model if hasattr(lm, "model") else lm
    ad = ModelAdapter(model)
    all_names = hook_names(model)
    chosen = all_names if names is None else [n for n in all_names if names(n)] if callable(names) else list(names)
    for n in chosen:
        _parse(model, n)
    got: dict[str, torch.Tensor] = {}
    with ExitStack() as st:
        for n in chosen:
            st.enter_context(hook(model, n, lambda v, n=n: got.__setitem__(n, v.detach().clone())))
        with torch.no_grad():
            logits = model(**inputs).logits
    img = ad.image_mask(inputs["input_ids"])
    return logits, ActivationCache(got, ad.n_layers, ad.n_heads, [torch.nonzero(m).flatten().tolist() for m in img])


PER = ("head", "layer", "position")


def patch(lm, inputs: dict, source: ActivationCache, metric: Callable[[torch.Tensor], torch.Tensor],
          point: str = "attn.hook_z", per: str = "head") -> np.ndarray:
    """Activation patching: for each component, run ``inputs`` with that component's value at
    ``point`` taken from ``source`` (a cache of another run with the same positions) and return
    ``metric(logits) - metric(clean logits)``.  ``metric`` maps logits ``[B, T, V]`` to ``[B]``.

    ``per="head"`` (``attn.hook_z`` only): ``[L, H]``, the heads of a layer batched in one forward;
    ``per="layer"``: ``[L]``; ``per="position"``: ``[L, T]`` (the whole point at one position).
    """
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    if per == "head" and point != "attn.hook_z":
        raise ValueError("per='head' patches head outputs: use point='attn.hook_z'")
    model = lm.model if hasattr(lm, "model") else lm
    ad = ModelAdapter(model)
    L, H = ad.n_layers, ad.n_heads
    B = inputs["input_ids"].shape[0]
    if B != 1:
        raise ValueError("patch takes one sequence (batch size 1); the components are batched internally")
    with torch.no_grad():
        base = float(metric(model(**inputs).logits)[0])
    T = inputs["input_ids"].shape[1]
    n = {"head": H, "layer": 1, "position": T}[per]
    rep = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    out = np.zeros((L, n))
    for l in range(L):
        src = source[f"blocks.{l}.{point}"]

        def edit(v, src=src):
            v = v.clone()
            if per == "head":
                for h in range(H):
                    v[h, :, h] = src[0, :, h]
            elif per == "layer":
                v[:] = src
            else:  # position t of copy t; a pattern's query axis is dim 2, the others' positions dim 1
                for t in range(T):
                    if point == "attn.hook_pattern":
                        v[t, :, t] = src[0, :, t]
                    else:
                        v[t, t] = src[0, t]
            return v
        with hook(model, f"blocks.{l}.{point}", edit), torch.no_grad():
            out[l] = (metric(model(**rep).logits) - base).float().cpu().numpy()
    return out[:, 0] if per == "layer" else out


def patch_head(lm, inputs, source, metric) -> np.ndarray:
    """``[L, H]``: each head's output (every position) from ``source``."""
    return patch(lm, inputs, source, metric, "attn.hook_z", "head")


def patch_layer(lm, inputs, source, metric, point: str = "attn.hook_result") -> np.ndarray:
    """``[L]``: a layer's whole value at ``point`` (default the attention output) from ``source``."""
    return patch(lm, inputs, source, metric, point, "layer")


def patch_position(lm, inputs, source, metric, point: str = "hook_resid_post") -> np.ndarray:
    """``[L, T]``: the value at ``point`` at one position from ``source``."""
    return patch(lm, inputs, source, metric, point, "position")
