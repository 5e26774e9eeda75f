"""Causal maps of one event: how much each layer / head moves
``m = log p(hallucinated) - log p(preferred)`` at the event's step when it is ablated, corrected
alone, or patched from the counterfactual run; plus attribution patching (one forward and one
backward pass for all heads).

Effects are ``m(intervened) - m(clean)``: negative = the intervention suppresses the
hallucination.  Every map batches its components (heads of a layer, or layers) into one forward.
Maps (``[L, H]`` for heads, ``[L]`` for layers):

- ``head_zero``, ``head_mean``: a head's output (its slice of ``o_proj``'s input, every position)
  set to zero / to its mean over the sequence's positions;
- ``layer_zero``: a layer's whole attention output set to zero (every position);
- ``correct_layer``: D-LEAF's fusion (gamma = 1, below-mean heads -> best head) in that one layer,
  on the last query row;  ``correct_head``: that one head's last row replaced by the best head's;
- ``patch_head``, ``patch_layer``: the head's (layer's attention) output at every position taken
  from the counterfactual run (the cue object removed from the image);  ``patch_head_reverse``:
  the clean output patched into the counterfactual run, signed like the others:
  ``m_cf - m(cf with the clean head)``, so that a head carrying the hallucination (restoring it
  into the counterfactual raises ``m``) is negative here too;
- ``attribution_head``: ``sum_pos (z_cf - z) . dm/dz`` at the clean run, with the full gradient
  (every path through later layers; a first-order approximation of ``patch_head``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis import hooks, lens
from dleaf_analysis.interventions import DLeaf, fuse_heads, image_columns
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.studies.events import logit_diff

HEAD_MAPS = ("head_zero", "head_mean", "correct_head", "patch_head", "patch_head_reverse", "attribution_head")
LAYER_MAPS = ("layer_zero", "correct_layer", "patch_layer")


def _z_flat(model, layer: int, fn):
    """``lens.hook`` on head outputs, with ``fn`` seeing them concatenated: ``[B, T, H * d]``
    (``o_proj``'s input)."""
    return lens.hook(model, f"blocks.{layer}.attn.hook_z", lambda z: fn(z.flatten(-2)).view(z.shape))


def head_outputs(lm, inputs: dict) -> list[torch.Tensor]:
    """Per layer, ``o_proj``'s input (the concatenated head outputs) ``[T, H * d]`` of one run."""
    _, cache = lens.run_with_cache(lm, inputs, names=lambda n: n.endswith("attn.hook_z"))
    return [cache[f"blocks.{l}.attn.hook_z"][0].flatten(-2) for l in range(cache.n_layers)]


def _metric(lm, inputs: dict, tok: int, pref: int) -> torch.Tensor:
    with torch.no_grad():
        return logit_diff(lm.model(**inputs).logits, tok, pref)


def causal_maps(lm, inputs: dict, token_id: int, preferred_id: int, cf_inputs: dict | None = None,
                kinds: tuple[str, ...] = ("ablation", "patching"), batch_size: int | None = None) -> dict:
    """Maps for one event (see module doc), every one through the one patching engine
    (:func:`dleaf_analysis.lens.patch`).  ``kinds``: "ablation" (ablation and correction maps)
    and/or "patching" (patching and attribution maps, which need ``cf_inputs``: the
    counterfactual run's inputs, same positions).  ``batch_size``: at most this many intervened
    copies per forward (default: all heads of a layer, or all layers, at once); it bounds memory
    on large models.  Returns ``{name: array}`` plus the clean (and counterfactual) metric values."""
    hooks.install(lm.model)
    base = float(_metric(lm, inputs, token_id, preferred_id)[0])
    out: dict = {"m_clean": base}
    metric = lambda logits: logit_diff(logits, token_id, preferred_id)  # noqa: E731
    if "ablation" in kinds:
        out.update(_ablation_maps(lm, inputs, metric, base, batch_size))
    if "patching" in kinds and cf_inputs is not None:
        out.update(_patching_maps(lm, inputs, cf_inputs, token_id, preferred_id, metric, base, batch_size))
    return out


def _fused_last_row(pattern: torch.Tensor, img: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """D-LEAF's fusion at gamma = 1 on the last query row of one copy's pattern ``[H, Q, K]``:
    below-mean heads toward the best (``head=None``: the layer's correction), or only ``head``
    (``correct_head``; nothing if it is the best).  Returns the new last rows ``[H, K]``."""
    row = pattern[None, :, -1, :]  # [1, H, K]
    iaf = D.iaf(image_columns(row.float(), img[None, : row.shape[-1]]))
    best = iaf.argmax(-1)
    if head is None:
        sel = DLeaf(gamma=1.0).select_heads(iaf)
    else:
        heads = torch.arange(row.shape[1], device=row.device)
        sel = (heads == head)[None] & (heads[None] != best[:, None])
    return fuse_heads(row, sel, best, 1.0)[0]


def _ablation_maps(lm, inputs, metric, base, batch_size=None) -> dict:
    adapter = ModelAdapter(lm.model)
    img = adapter.image_mask(inputs["input_ids"])[0]
    kw = dict(batch_size=batch_size, base=base)
    out = {
        "head_zero": lens.patch(lm, inputs, lambda v, l, h: torch.zeros_like(v[:, h]), metric, "attn.hook_z", "head", **kw),
        "head_mean": lens.patch(lm, inputs, lambda v, l, h: v[:, h].mean(0, keepdim=True).expand_as(v[:, h]), metric,
                                "attn.hook_z", "head", **kw),
        "layer_zero": lens.patch(lm, inputs, lambda v, l, i: torch.zeros_like(v), metric, "attn.hook_result", "layer",
                                 **kw),
    }

    # correction alone: D-LEAF's fusion (gamma = 1) on the last query row, in one layer or of one head
    def correct_layer(v, l, i):
        new = v.clone()
        new[:, -1, :] = _fused_last_row(v, img)
        return new

    out["correct_layer"] = lens.patch(lm, inputs, correct_layer, metric, "attn.hook_pattern", "layer",
                                      positions=[-1], **kw)
    out["correct_head"] = lens.patch(lm, inputs, lambda v, l, h: _fused_last_row(v, img, h)[h][None].expand(
        v.shape[1], -1), metric, "attn.hook_pattern", "head", positions=[-1], **kw)
    return out


def _patching_maps(lm, inputs, cf_inputs, tok, pref, metric, base, batch_size=None) -> dict:
    _, clean = lens.run_with_cache(lm, inputs, names=lambda n: n.endswith("attn.hook_z"))
    _, cf = lens.run_with_cache(lm, cf_inputs, names=lambda n: n.endswith("attn.hook_z"))
    m_cf = float(_metric(lm, cf_inputs, tok, pref)[0])
    kw = dict(batch_size=batch_size)
    out = {"m_cf": m_cf}
    out["patch_head"] = lens.patch(lm, inputs, cf, metric, "attn.hook_z", "head", base=base, **kw)
    # restoring a carrier head into the counterfactual raises m: negate so "carries" is negative everywhere
    out["patch_head_reverse"] = -lens.patch(lm, cf_inputs, clean, metric, "attn.hook_z", "head", base=m_cf, **kw)
    out["patch_layer"] = lens.patch(lm, inputs, cf, metric, "attn.hook_z", "layer", base=base, **kw)
    L = len(clean.values)
    clean_z = [clean[f"blocks.{l}.attn.hook_z"][0].flatten(-2) for l in range(L)]
    cf_z = [cf[f"blocks.{l}.attn.hook_z"][0].flatten(-2) for l in range(L)]
    out["attribution_head"] = attribution_patching(lm, inputs, tok, pref, clean_z, cf_z)
    return out


GRADIENTS = ("full", "direct")


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


def attribution_patching(lm, inputs: dict, tok: int, pref: int, clean_z, cf_z, gradient: str = "full") -> np.ndarray:
    """``[L, H]``: ``sum_pos (z_cf - z_clean) . dm/dz`` from one forward and one backward pass.

    ``gradient="full"`` (default): a zero-valued leaf is *added* to every layer's ``o_proj``
    input, so the gradient at layer ``l`` includes every path through the later layers: the
    first-order approximation of ``patch_head``.  ``"direct"``: every layer's input is a
    detached copy, which cuts the paths through later layers' attention (kept only to show what
    that costs; it is not an approximation of patching).
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; choose one of {GRADIENTS}")
    adapter = ModelAdapter(lm.model)
    L, H, d = adapter.n_layers, adapter.n_heads, adapter.head_dim
    leaves: dict[int, torch.Tensor] = {}

    def capture(x, l):
        if gradient == "direct":
            leaves[l] = x.detach().requires_grad_(True)
            return leaves[l]
        leaves[l] = torch.zeros_like(x, requires_grad=True)
        return x + leaves[l]

    with ExitStack() as st:
        for l in range(L):
            st.enter_context(_z_flat(lm.model, l, lambda x, l=l: capture(x, l)))
        with torch.enable_grad(), frozen_parameters(lm.model):
            m = logit_diff(lm.model(**inputs).logits, tok, pref).sum()
            grads = torch.autograd.grad(m, [leaves[l] for l in range(L)])
    res = np.zeros((L, H))
    for l in range(L):
        delta = (cf_z[l] - clean_z[l]) * grads[l][0]  # [T, H*d]
        res[l] = delta.view(delta.shape[0], H, d).sum((0, 2)).detach().cpu().numpy()
    return res
