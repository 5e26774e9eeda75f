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
        handle = ad.output_projection(layer).register_forward_pre_hook(pre)
    elif point == "attn.hook_result":
        handle = ad.output_projection(layer).register_forward_hook(lambda m, i, o: fn(o))
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
Source = "ActivationCache | Callable[[torch.Tensor, int, int], torch.Tensor]"


def _chunks(n: int, batch_size: int | None) -> list[list[int]]:
    """``0..n-1`` in consecutive chunks of at most ``batch_size`` (all at once if ``None``)."""
    bs = n if batch_size is None else max(1, int(batch_size))
    return [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]


def _replacement(source, point: str, layer: int, index: int, current: torch.Tensor) -> torch.Tensor:
    """The new value of one copy's layer: from a cache of another run, or computed by ``source``."""
    if callable(source):
        return source(current, layer, index)
    return source[f"blocks.{layer}.{point}"][0]


def patch(lm, inputs: dict, source, metric: Callable[[torch.Tensor], torch.Tensor], point: str = "attn.hook_z",
          per: str = "head", batch_size: int | None = None, positions: list[int] | None = None,
          base: float | None = None) -> np.ndarray:
    """The patching engine: for each component, run ``inputs`` with that component's value at
    ``point`` replaced, and return ``metric(logits) - metric(clean logits)``; ``metric`` maps logits
    ``[B, T, V]`` to ``[B]``.  Components are batched as copies of the one input sequence (at most
    ``batch_size`` copies per forward).

    ``source``: an :class:`ActivationCache` of another run with the same positions (activation
    patching), or ``fn(value, layer, index) -> value`` computing the replacement of one component
    from the copy's current value (ablation: zeros, a mean; a corrected attention row).  ``value`` is
    the copy's whole value at ``point`` (``hook_z``: ``[T, H, d]``; ``hook_pattern``: ``[H, Q, K]``),
    so that a replacement may depend on the other heads; ``index`` is the head (``per="head"``), the
    position (``per="position"``) or ``-1`` (``per="layer"``), and the result is that component's new
    value (a head: ``[T, d]`` / ``[Q, K]``; a layer: the whole value; a position: its row).

    ``per="head"`` (``hook_z``, ``hook_pattern``): ``[L, H]``, the heads of a layer as copies of one
    forward; ``per="layer"``: ``[L]``, the layers as copies of one forward (copy ``b`` edits layer
    ``b``); ``per="position"``: ``[L, T]``.  ``positions`` (``per="head"`` / ``"layer"``): replace
    only these positions (query rows for ``hook_pattern``; e.g. ``[-1]``: the last query), every
    position by default.
    """
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    if per == "head" and point not in ("attn.hook_z", "attn.hook_pattern"):
        raise ValueError("per='head' patches head outputs or patterns: use point='attn.hook_z' or 'attn.hook_pattern'")
    model = lm.model if hasattr(lm, "model") else lm
    ad = ModelAdapter(model)
    L, H = ad.n_layers, ad.n_heads
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("patch takes one sequence (batch size 1); the components are batched internally")
    if base is None:
        with torch.no_grad():
            base = float(metric(model(**inputs).logits)[0])
    T = inputs["input_ids"].shape[1]
    pos = slice(None) if positions is None else list(positions)
    pattern = point == "attn.hook_pattern"

    def rep(n: int) -> dict:
        return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}

    def run(copies: dict, n: int) -> np.ndarray:
        with ExitStack() as st, torch.no_grad():
            for l, edit in copies.items():
                st.enter_context(hook(model, f"blocks.{l}.{point}", edit))
            return (metric(model(**rep(n)).logits) - base).float().cpu().numpy()

    if per == "layer":
        out = np.zeros(L)
        for ls in _chunks(L, batch_size):
            def make(b: int, l: int):
                def edit(v):
                    v = v.clone()
                    if pattern:
                        v[b][:, pos] = _replacement(source, point, l, -1, v[b])[:, pos]
                    else:
                        v[b][pos] = _replacement(source, point, l, -1, v[b])[pos]
                    return v
                return edit
            out[ls] = run({l: make(b, l) for b, l in enumerate(ls)}, len(ls))
        return out
    n = H if per == "head" else T
    out = np.zeros((L, n))
    for idx in _chunks(n, batch_size):
        for l in range(L):
            def edit(v, l=l, idx=idx):
                v = v.clone()
                for b, j in enumerate(idx):
                    if per == "head" and pattern:  # v [B, H, Q, K]; the head's rows [Q, K]
                        new = source(v[b], l, j) if callable(source) else source[f"blocks.{l}.{point}"][0, j]
                        v[b, j][pos] = new[pos]
                    elif per == "head":  # v [B, T, H, d]; the head's output [T, d]
                        new = source(v[b], l, j) if callable(source) else source[f"blocks.{l}.{point}"][0, :, j]
                        v[b, :, j][pos] = new[pos]
                    elif pattern:  # one query row of every head
                        v[b, :, j] = source(v[b], l, j) if callable(source) else source[f"blocks.{l}.{point}"][0, :, j]
                    else:
                        v[b, j] = source(v[b], l, j) if callable(source) else source[f"blocks.{l}.{point}"][0, j]
                return v
            out[l, idx] = run({l: edit}, len(idx))
    return out


def patch_head(lm, inputs, source, metric, batch_size: int | None = None) -> np.ndarray:
    """``[L, H]``: each head's output (every position) from ``source``."""
    return patch(lm, inputs, source, metric, "attn.hook_z", "head", batch_size)


def patch_layer(lm, inputs, source, metric, point: str = "attn.hook_result", batch_size: int | None = None) -> np.ndarray:
    """``[L]``: a layer's whole value at ``point`` (default the attention output) from ``source``."""
    return patch(lm, inputs, source, metric, point, "layer", batch_size)


def patch_position(lm, inputs, source, metric, point: str = "hook_resid_post", batch_size: int | None = None) -> np.ndarray:
    """``[L, T]``: the value at ``point`` at one position from ``source``."""
    return patch(lm, inputs, source, metric, point, "position", batch_size)
