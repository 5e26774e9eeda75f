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
    count_cost(float(inputs["input_ids"].shape[0]), int(inputs["input_ids"].shape[0]))
    img = ad.image_mask(inputs["input_ids"])
    return logits, ActivationCache(got, ad.n_layers, ad.n_heads, [torch.nonzero(m).flatten().tolist() for m in img])


_METER: list[dict] = []  # active cost meters (forward-equivalents: sequences x share of the layers run)


@contextmanager
def cost_meter() -> Iterator[dict]:
    """Counts the compute of the block in *forward-equivalents* (one forward of one sequence
    through every layer = 1; a copy run from layer ``l`` of ``L`` = ``(L - l) / L``; a one-token
    step over a KV cache = ``1 / T``; a backward = 2): ``{"forward_equivalents": float,
    "sequences": int}``.  Counted by the engine itself (:func:`run_from`, :func:`patch`,
    :func:`integrated_gradients`, :func:`run_with_cache`, the last-row step of the causal maps)."""
    m = {"forward_equivalents": 0.0, "sequences": 0}
    _METER.append(m)
    try:
        yield m
    finally:
        _METER.remove(m)


def count_cost(fe: float, sequences: int = 0) -> None:
    """Add to every active :func:`cost_meter`."""
    for m in _METER:
        m["forward_equivalents"] += fe
        m["sequences"] += sequences


@dataclass
class LayerInputs:
    """One clean run's input to every decoder layer: ``hidden [L] x [1, T, D]`` and the keyword
    arguments each layer was called with (mask, rotary embeddings, positions), so that a copy can
    be run from layer ``l`` on without recomputing the layers below it (:func:`run_from`)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    logits: torch.Tensor  # the clean run's last-position logits [1, V]


def capture_layer_inputs(lm, inputs: dict) -> LayerInputs:
    """One forward pass (no KV cache) recording every decoder layer's input."""
    model = lm.model if hasattr(lm, "model") else lm
    ad = ModelAdapter(model)
    hidden, kwargs = {}, {}
    handles = []
    for l, layer in enumerate(ad.layers):
        def pre(m, args, kw, l=l):
            hidden[l] = (args[0] if args else kw["hidden_states"]).detach()
            kwargs[l] = {k: v for k, v in kw.items() if k != "hidden_states" and k not in ("past_key_values",)}
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    count_cost(1.0, 1)
    return LayerInputs([hidden[l] for l in range(ad.n_layers)], [kwargs[l] for l in range(ad.n_layers)], logits)


def run_from(lm, cache: LayerInputs, layer: int, n: int) -> torch.Tensor:
    """``n`` copies of the clean run, executed from decoder layer ``layer`` on (the layers below are
    the cached clean ones; hooks on ``layer`` and above see the copies); the last position's
    logits ``[n, 1, V]``.  A copy costs ``(L - layer) / L`` of a forward."""
    model = lm.model if hasattr(lm, "model") else lm
    ad = ModelAdapter(model)
    h = cache.hidden[layer].expand(n, -1, -1).contiguous()
    count_cost(n * (ad.n_layers - layer) / ad.n_layers, n)
    for j in range(layer, ad.n_layers):
        out = ad.layers[j](h, **cache.kwargs[j])
        h = out[0] if isinstance(out, tuple) else out
    h = ad.language_model.norm(h[:, -1:])
    return model.get_output_embeddings()(h)


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
          base: float | None = None, start: str = "input", layers: LayerInputs | None = None,
          cells: dict[int, list[int]] | None = None) -> np.ndarray:
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

    ``start="layer"``: every copy that edits layer ``l`` runs from layer ``l`` on, over the clean
    run's cached input to that layer (:func:`capture_layer_inputs`, or ``layers``): the layers below
    are identical in every copy, so they are not recomputed (a copy costs ``(L - l) / L`` of a
    forward; ``per="layer"`` then runs one copy per layer).  Forwards that edit no attention
    pattern use the fast sdpa kernel.  ``start="input"``: full forwards of the batched copies.

    ``cells`` (``per="head"``): only these heads of these layers (``{layer: [heads]}``); the others
    are NaN (how the localisation study verifies an attribution ranking exactly).
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
    if start not in ("input", "layer"):
        raise ValueError(f"start must be 'input' or 'layer', got {start!r}")
    pattern = point == "attn.hook_pattern"
    if start == "layer" and layers is None:
        with hooks.prompt_rows(model, "all" if pattern else "none"):
            layers = capture_layer_inputs(lm, inputs)
    if base is None:
        if layers is not None:
            base = float(metric(layers.logits[:, None])[0])
        else:
            with torch.no_grad():
                base = float(metric(model(**inputs).logits)[0])
    T = inputs["input_ids"].shape[1]
    pos = slice(None) if positions is None else list(positions)

    def rep(n: int) -> dict:
        return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}

    def run(copies: dict, n: int) -> np.ndarray:
        with ExitStack() as st, torch.no_grad():
            for l, edit in copies.items():
                st.enter_context(hook(model, f"blocks.{l}.{point}", edit))
            if start == "layer":
                st.enter_context(hooks.prompt_rows(model, "all" if pattern else "none"))
                logits = run_from(lm, layers, min(copies), n)
            else:
                count_cost(float(n), n)
                logits = model(**rep(n)).logits
            return (metric(logits) - base).float().cpu().numpy()

    if per == "layer" and start == "layer":
        out = np.zeros(L)
        for l in range(L):
            def edit_one(v, l=l):
                v = v.clone()
                if pattern:
                    v[0][:, pos] = _replacement(source, point, l, -1, v[0])[:, pos]
                else:
                    v[0][pos] = _replacement(source, point, l, -1, v[0])[pos]
                return v
            out[l] = run({l: edit_one}, 1)[0]
        return out
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
    if cells is not None:
        if per != "head":
            raise ValueError("cells= selects heads: use it with per='head'")
        out[:] = np.nan
        jobs = [(l, list(hs)) for l, hs in sorted(cells.items()) if hs]
    else:
        jobs = [(l, None) for l in range(L)]
    for l, hs in jobs:
        chunks = _chunks(n, batch_size) if hs is None else \
            [hs[s:s + (batch_size or len(hs))] for s in range(0, len(hs), batch_size or len(hs))]
        for idx in chunks:
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


@contextmanager
def frozen_parameters(model):
    """The model's parameters stop requiring gradients for the block (restored after): a backward
    to activations then keeps no layer inputs for weight gradients (on a 7B model, most of the
    memory of a backward)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def integrated_gradients(lm, inputs: dict, source, metric: Callable[[torch.Tensor], torch.Tensor],
                         layers: LayerInputs | None = None, clean: "ActivationCache | None" = None,
                         alpha: float = 0.5) -> np.ndarray:
    """``[L, H]``: per-layer midpoint integrated gradients of head patching at ``attn.hook_z``.

    For layer ``l``, every head's output moves along its own layer's path from the clean value
    ``z`` toward the patched value ``z'`` (``source``: a cache of another run, or ``fn(value,
    layer, head)`` as in :func:`patch`); the gradient of ``metric`` is taken at ``z + alpha (z' -
    z)`` (one step, the midpoint rule) with the other layers clean, and head ``h`` gets
    ``(z'_h - z_h) . dm/dz_h``: a first-order estimate of patching that head alone which, unlike
    attribution patching at ``z``, sees the layer's own nonlinearity on the way.  One forward and
    one backward from layer ``l`` on per layer (over the cached clean layer inputs)."""
    model = lm.model if hasattr(lm, "model") else lm
    ad = ModelAdapter(model)
    L, H = ad.n_layers, ad.n_heads
    if layers is None:
        with hooks.prompt_rows(model, "none"):
            layers = capture_layer_inputs(lm, inputs)
    if clean is None:
        with hooks.prompt_rows(model, "none"):
            _, clean = run_with_cache(lm, inputs, names=lambda n: n.endswith("attn.hook_z"))
    out = np.zeros((L, H))
    for l in range(L):
        z = clean[f"blocks.{l}.attn.hook_z"][0]  # [T, H, d]
        if callable(source):
            zt = torch.stack([source(z, l, h) for h in range(H)], 1)
        else:
            zt = source[f"blocks.{l}.attn.hook_z"][0]
        dz = (zt - z).detach()
        leaf = (z + alpha * dz).detach().requires_grad_(True)
        with hook(model, f"blocks.{l}.attn.hook_z", lambda v, leaf=leaf: leaf[None].expand_as(v)), \
                hooks.prompt_rows(model, "none"), torch.enable_grad(), frozen_parameters(model):
            m = metric(run_from(lm, layers, l, 1)).sum()
            (g,) = torch.autograd.grad(m, [leaf])
        count_cost(2 * (L - l) / L)  # the backward
        out[l] = (dz * g).sum((0, 2)).detach().float().cpu().numpy()
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
