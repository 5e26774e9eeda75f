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


def _rep(inputs: dict, n: int) -> dict:
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}


def _chunks(n: int, batch_size: int | None) -> list[list[int]]:
    """``0..n-1`` in consecutive chunks of at most ``batch_size`` (all at once if ``None``)."""
    bs = n if batch_size is None else max(1, int(batch_size))
    return [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]


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
    """Maps for one event (see module doc).  ``kinds``: "ablation" (ablation and correction maps)
    and/or "patching" (patching and attribution maps, which need ``cf_inputs``: the
    counterfactual run's inputs, same positions).  ``batch_size``: at most this many intervened
    copies per forward (default: all heads of a layer, or all layers, at once); it bounds memory
    on large models.  Returns ``{name: array}`` plus the clean (and counterfactual) metric values."""
    adapter = ModelAdapter(lm.model)
    hooks.install(lm.model)
    L, H, d = adapter.n_layers, adapter.n_heads, adapter.head_dim
    tok, pref = token_id, preferred_id
    base = float(_metric(lm, inputs, tok, pref)[0])
    out: dict = {"m_clean": base}
    clean_z = head_outputs(lm, inputs)

    def per_head(edit_fn, src_inputs, ref: float) -> np.ndarray:
        """For each layer: batches of copies, copy b edited at head ``hs[b]`` by ``edit_fn(x_h, l, h)``."""
        res = np.zeros((L, H))
        for hs in _chunks(H, batch_size):
            rep = _rep(src_inputs, len(hs))
            for l in range(L):
                def fn(x, l=l, hs=hs):
                    x = x.clone()
                    for b, h in enumerate(hs):
                        sl = slice(h * d, (h + 1) * d)
                        x[b, :, sl] = edit_fn(x[b, :, sl], l, h)
                    return x
                with _z_flat(lm.model, l, fn):
                    res[l, hs] = (_metric(lm, rep, tok, pref) - ref).cpu().numpy()
        return res

    if "ablation" in kinds:
        out.update(_ablation_maps(lm, inputs, tok, pref, base, per_head, batch_size))
    if "patching" in kinds and cf_inputs is not None:
        out.update(_patching_maps(lm, inputs, cf_inputs, tok, pref, base, clean_z, per_head, batch_size))
    return out


def _ablation_maps(lm, inputs, tok, pref, base, per_head, batch_size=None) -> dict:
    adapter = ModelAdapter(lm.model)
    L, H = adapter.n_layers, adapter.n_heads
    out = {}
    out["head_zero"] = per_head(lambda x, l, h: torch.zeros_like(x), inputs, base)
    out["head_mean"] = per_head(lambda x, l, h: x.mean(0, keepdim=True).expand_as(x), inputs, base)

    # layer_zero: batches of copies, copy b has layer ls[b]'s attention output zeroed
    out["layer_zero"] = np.zeros(L)
    for ls in _chunks(L, batch_size):
        with ExitStack() as st:
            for b, l in enumerate(ls):
                def zero(o, b=b):
                    o = o.clone()
                    o[b] = 0
                    return o
                st.enter_context(lens.hook(lm.model, f"blocks.{l}.attn.hook_result", zero))
            out["layer_zero"][ls] = (_metric(lm, _rep(inputs, len(ls)), tok, pref) - base).cpu().numpy()

    # correction alone: fusion in one layer (copy b: layer ls[b]), gamma = 1, last query row
    img = adapter.image_mask(inputs["input_ids"])[0]
    sel_cfg = DLeaf(gamma=1.0)
    out["correct_layer"] = np.zeros(L)
    for ls in _chunks(L, batch_size):
        def correct_layer_editor(pattern, layer, ls=ls):
            if layer not in ls:
                return pattern
            b = ls.index(layer)
            row = pattern[b:b + 1, :, -1, :]
            iaf = D.iaf(image_columns(row.float(), img[None, : row.shape[-1]]))
            sel = sel_cfg.select_heads(iaf)
            pattern = pattern.clone()
            pattern[b:b + 1, :, -1, :] = fuse_heads(row, sel, iaf.argmax(-1), 1.0)
            return pattern

        with hooks.attach_editor(lm.model, correct_layer_editor):
            out["correct_layer"][ls] = (_metric(lm, _rep(inputs, len(ls)), tok, pref) - base).cpu().numpy()

    res = np.zeros((L, H))
    for hs in _chunks(H, batch_size):
        repH = _rep(inputs, len(hs))
        for l in range(L):
            def correct_head_editor(pattern, layer, l=l, hs=hs):
                if layer != l:
                    return pattern
                row = pattern[:, :, -1, :]
                iaf = D.iaf(image_columns(row.float(), img[None].expand(row.shape[0], -1)))
                best = iaf.argmax(-1)
                heads = torch.arange(H, device=row.device)
                sel = heads[None] == torch.tensor(hs, device=row.device)[:, None]  # copy b corrects head hs[b]
                pattern = pattern.clone()
                pattern[:, :, -1, :] = fuse_heads(row, sel & (heads[None] != best[:, None]), best, 1.0)
                return pattern
            with hooks.attach_editor(lm.model, correct_head_editor):
                res[l, hs] = (_metric(lm, repH, tok, pref) - base).cpu().numpy()
    out["correct_head"] = res
    return out


def _patching_maps(lm, inputs, cf_inputs, tok, pref, base, clean_z, per_head, batch_size=None) -> dict:
    adapter = ModelAdapter(lm.model)
    L, d = adapter.n_layers, adapter.head_dim
    cf_z = head_outputs(lm, cf_inputs)
    m_cf = float(_metric(lm, cf_inputs, tok, pref)[0])
    out = {"m_cf": m_cf}
    out["patch_head"] = per_head(lambda x, l, h: cf_z[l][:, h * d:(h + 1) * d], inputs, base)
    # restoring a carrier head into the counterfactual raises m: negate so "carries" is negative everywhere
    out["patch_head_reverse"] = -per_head(lambda x, l, h: clean_z[l][:, h * d:(h + 1) * d], cf_inputs, m_cf)
    out["patch_layer"] = np.zeros(L)
    for ls in _chunks(L, batch_size):
        with ExitStack() as st:  # copy b: layer ls[b]'s attention output from the counterfactual run
            for b, l in enumerate(ls):
                def patch(x, b=b, l=l):
                    x = x.clone()
                    x[b] = cf_z[l]
                    return x
                st.enter_context(_z_flat(lm.model, l, patch))
            out["patch_layer"][ls] = (_metric(lm, _rep(inputs, len(ls)), tok, pref) - base).cpu().numpy()
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
