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
from dleaf_analysis.lens import frozen_parameters  # noqa: F401  (used here and re-exported)
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
        out = logit_diff(lm.model(**inputs).logits, tok, pref)
    lens.count_cost(float(inputs["input_ids"].shape[0]), int(inputs["input_ids"].shape[0]))
    return out


ENGINES = ("layer", "input")


def causal_maps(lm, inputs: dict, token_id: int, preferred_id: int, cf_inputs: dict | None = None,
                kinds: tuple[str, ...] = ("ablation", "patching"), batch_size: int | None = None,
                engine: str = "layer", head_ranking: str = "exact", ranking_options: dict | None = None) -> dict:
    """Maps for one event (see module doc), every one through the one patching engine
    (:func:`dleaf_analysis.lens.patch`).  ``kinds``: "ablation" (ablation and correction maps)
    and/or "patching" (patching and attribution maps, which need ``cf_inputs``: the
    counterfactual run's inputs, same positions).  ``batch_size``: at most this many intervened
    copies per forward (default: all heads of a layer at once); it bounds memory on large models.

    ``engine="layer"`` (default): a copy that edits layer ``l`` runs from layer ``l`` on over the
    clean run's cached input to that layer, and the last-row corrections run as one decoding step
    over the clean run's KV cache of the prefix; ``"input"``: every copy is a full forward (the
    reference; the two agree to float precision, tested).

    ``head_ranking="attribution"``: the head maps of :data:`HEAD_PATCH_MAPS` are ranked by
    integrated gradients and verified by exact patching on their top cells and a random sample
    (:func:`ranked_head_maps`, with ``ranking_options``); ``"exact"``: every cell exact.  Returns
    ``{name: array}`` plus the clean (and counterfactual) metric values."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    hooks.install(lm.model)
    metric = lambda logits: logit_diff(logits, token_id, preferred_id)  # noqa: E731
    layers = None
    if engine == "layer":
        with hooks.prompt_rows(lm.model, "none"):
            layers = lens.capture_layer_inputs(lm, inputs)
        base = float(metric(layers.logits[:, None])[0])
    else:
        base = float(_metric(lm, inputs, token_id, preferred_id)[0])
    out: dict = {"m_clean": base}
    heads = head_ranking == "exact"
    if head_ranking not in ("exact", "attribution"):
        raise ValueError(f"unknown head ranking {head_ranking!r}; choose exact or attribution")
    if "ablation" in kinds:
        out.update(_ablation_maps(lm, inputs, metric, base, batch_size, engine, layers, heads))
    if "patching" in kinds and cf_inputs is not None:
        out.update(_patching_maps(lm, inputs, cf_inputs, token_id, preferred_id, metric, base, batch_size, engine,
                                  layers, heads))
    if not heads:
        ranked = ranked_head_maps(lm, inputs, token_id, preferred_id, cf_inputs if "patching" in kinds else None,
                                  batch_size=batch_size, **(ranking_options or {}))
        keep = {"head_zero", "head_mean"} if "ablation" in kinds else set()
        keep |= {"patch_head", "patch_head_reverse"} if "patching" in kinds and cf_inputs is not None else set()
        out.update({k: v for k, v in ranked.items() if k.split(":")[-1] in keep})
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


def last_row_patch(lm, inputs: dict, edit, metric, per: str, batch_size: int | None = None,
                   base: float | None = None) -> np.ndarray:
    """Edits of the last query row only, as one decoding step over the clean KV cache of the prefix:
    ``edit(pattern_row [H, 1, K], layer, index) -> [H, 1, K]`` at layer ``layer`` for copy of
    component ``index`` (``per="layer"``: ``[L]``; ``per="head"``: ``[L, H]``).  A copy costs one
    token of a forward instead of a whole sequence."""
    import copy

    model = lm.model
    ad = ModelAdapter(model)
    L, H = ad.n_layers, ad.n_heads
    prefix = {k: (v[:, :-1] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    with torch.no_grad(), hooks.prompt_rows(model, "none"):
        past = model(**prefix, use_cache=True).past_key_values
    T = inputs["input_ids"].shape[1]
    lens.count_cost(1.0, 1)
    last = {"input_ids": inputs["input_ids"][:, -1:], "attention_mask": inputs["attention_mask"]}
    if base is None:
        with torch.no_grad():
            base = float(metric(model(**last, past_key_values=copy.deepcopy(past), use_cache=True).logits)[0])

    def run(jobs: list[tuple[int, int]]) -> np.ndarray:
        n = len(jobs)
        cache = copy.deepcopy(past)
        cache.batch_repeat_interleave(n)
        rep = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in last.items()}

        def editor(pattern, ctx):
            rows = [b for b, (l, _) in enumerate(jobs) if l == ctx.layer]
            if not rows:
                return pattern
            pattern = pattern.clone()
            for b in rows:
                pattern[b] = edit(pattern[b], ctx.layer, jobs[b][1])
            return pattern

        with torch.no_grad(), hooks.attach_editor(model, editor):
            logits = model(**rep, past_key_values=cache, use_cache=True).logits
        lens.count_cost(n / T, n)
        return (metric(logits) - base).float().cpu().numpy()

    jobs = [(l, -1) for l in range(L)] if per == "layer" else [(l, h) for l in range(L) for h in range(H)]
    bs = len(jobs) if batch_size is None else max(1, int(batch_size))
    vals = np.concatenate([run(jobs[s:s + bs]) for s in range(0, len(jobs), bs)])
    return vals if per == "layer" else vals.reshape(L, H)


def _ablation_maps(lm, inputs, metric, base, batch_size=None, engine="layer", layers=None, heads=True) -> dict:
    adapter = ModelAdapter(lm.model)
    img = adapter.image_mask(inputs["input_ids"])[0]
    kw = dict(batch_size=batch_size, base=base, start="layer" if engine == "layer" else "input", layers=layers)
    out = {"layer_zero": lens.patch(lm, inputs, lambda v, l, i: torch.zeros_like(v), metric, "attn.hook_result",
                                    "layer", **kw)}
    if heads:
        out["head_zero"] = lens.patch(lm, inputs, lambda v, l, h: torch.zeros_like(v[:, h]), metric, "attn.hook_z",
                                      "head", **kw)
        out["head_mean"] = lens.patch(lm, inputs, lambda v, l, h: v[:, h].mean(0, keepdim=True).expand_as(v[:, h]),
                                      metric, "attn.hook_z", "head", **kw)
    # correction alone: D-LEAF's fusion (gamma = 1) on the last query row, in one layer or of one head
    if engine == "layer":
        def fix_layer(p, l, i):
            p = p.clone()
            p[:, -1, :] = _fused_last_row(p, img)
            return p

        def fix_head(p, l, h):
            p = p.clone()
            p[h, -1, :] = _fused_last_row(p, img, h)[h]
            return p

        out["correct_layer"] = last_row_patch(lm, inputs, fix_layer, metric, "layer", batch_size, base)
        out["correct_head"] = last_row_patch(lm, inputs, fix_head, metric, "head", batch_size, base)
        return out

    def correct_layer(v, l, i):
        new = v.clone()
        new[:, -1, :] = _fused_last_row(v, img)
        return new

    kw_in = dict(batch_size=batch_size, base=base)
    out["correct_layer"] = lens.patch(lm, inputs, correct_layer, metric, "attn.hook_pattern", "layer",
                                      positions=[-1], **kw_in)
    out["correct_head"] = lens.patch(lm, inputs, lambda v, l, h: _fused_last_row(v, img, h)[h][None].expand(
        v.shape[1], -1), metric, "attn.hook_pattern", "head", positions=[-1], **kw_in)
    return out


def _patching_maps(lm, inputs, cf_inputs, tok, pref, metric, base, batch_size=None, engine="layer", layers=None,
                   heads=True) -> dict:
    with hooks.prompt_rows(lm.model, "none"):
        _, clean = lens.run_with_cache(lm, inputs, names=lambda n: n.endswith("attn.hook_z"))
        _, cf = lens.run_with_cache(lm, cf_inputs, names=lambda n: n.endswith("attn.hook_z"))
    start = "layer" if engine == "layer" else "input"
    cf_layers = None
    if engine == "layer":
        with hooks.prompt_rows(lm.model, "none"):
            cf_layers = lens.capture_layer_inputs(lm, cf_inputs)
        m_cf = float(metric(cf_layers.logits[:, None])[0])
    else:
        m_cf = float(_metric(lm, cf_inputs, tok, pref)[0])
    kw = dict(batch_size=batch_size, start=start)
    out = {"m_cf": m_cf}
    if heads:
        out["patch_head"] = lens.patch(lm, inputs, cf, metric, "attn.hook_z", "head", base=base, layers=layers, **kw)
        # restoring a carrier head into the counterfactual raises m: negate so "carries" is negative everywhere
        out["patch_head_reverse"] = -lens.patch(lm, cf_inputs, clean, metric, "attn.hook_z", "head", base=m_cf,
                                                layers=cf_layers, **kw)
    out["patch_layer"] = lens.patch(lm, inputs, cf, metric, "attn.hook_z", "layer", base=base, layers=layers, **kw)
    L = len(clean.values)
    clean_z = [clean[f"blocks.{l}.attn.hook_z"][0].flatten(-2) for l in range(L)]
    cf_z = [cf[f"blocks.{l}.attn.hook_z"][0].flatten(-2) for l in range(L)]
    out["attribution_head"] = attribution_patching(lm, inputs, tok, pref, clean_z, cf_z)
    return out


HEAD_PATCH_MAPS = ("head_zero", "head_mean", "patch_head", "patch_head_reverse")


def ranked_head_maps(lm, inputs: dict, token_id: int, preferred_id: int, cf_inputs: dict | None,
                     top_fraction: float = 0.1, random_fraction: float = 0.05, seed: int = 0,
                     batch_size: int | None = None, exact: bool = False) -> dict:
    """The head maps of :data:`HEAD_PATCH_MAPS` ranked by per-layer midpoint integrated gradients
    (:func:`dleaf_analysis.lens.integrated_gradients`) and verified by exact patching on the top
    ``top_fraction`` of the cells (by causal score: most negative first) plus a random
    ``random_fraction`` of the rest.  Returns ``{map: [L, H]}`` with exact effects where verified
    and the attribution estimate elsewhere, ``{f"ig:{map}": [L, H]}`` (the estimates) and
    ``{f"exact:{map}": bool [L, H]}`` (which cells are exact).  ``exact=True``: every cell exact
    too (a verification event: recall of the ranking against exact patching can be measured)."""
    model = lm.model
    ad = ModelAdapter(model)
    L, H = ad.n_layers, ad.n_heads
    metric = lambda logits: logit_diff(logits, token_id, preferred_id)  # noqa: E731
    with hooks.prompt_rows(model, "none"):
        layers = lens.capture_layer_inputs(lm, inputs)
        _, clean = lens.run_with_cache(lm, inputs, names=lambda n: n.endswith("attn.hook_z"))
    base = float(metric(layers.logits[:, None])[0])
    specs = {"head_zero": (inputs, layers, clean, lambda v, l, h: torch.zeros_like(v[:, h]), base, 1.0),
             "head_mean": (inputs, layers, clean, lambda v, l, h: v[:, h].mean(0, keepdim=True).expand_as(v[:, h]),
                           base, 1.0)}
    if cf_inputs is not None:
        with hooks.prompt_rows(model, "none"):
            cf_layers = lens.capture_layer_inputs(lm, cf_inputs)
            _, cf = lens.run_with_cache(lm, cf_inputs, names=lambda n: n.endswith("attn.hook_z"))
        m_cf = float(metric(cf_layers.logits[:, None])[0])
        specs["patch_head"] = (inputs, layers, clean, cf, base, 1.0)
        specs["patch_head_reverse"] = (cf_inputs, cf_layers, cf, clean, m_cf, -1.0)
    rng = np.random.default_rng(seed)
    n_top = max(1, int(np.ceil(top_fraction * L * H)))
    n_rand = int(np.ceil(random_fraction * L * H))
    out: dict = {}
    for name, (x, xl, xc, src, b, sign) in specs.items():
        ig = sign * lens.integrated_gradients(lm, x, src, metric, layers=xl, clean=xc)
        order = np.argsort(ig, axis=None, kind="stable")  # most negative (most suppressing) first
        top = set(order[:n_top].tolist())
        rest = [c for c in range(L * H) if c not in top]
        chosen = sorted(top | set(rng.choice(rest, size=min(n_rand, len(rest)), replace=False).tolist())) \
            if not exact else list(range(L * H))
        cells: dict[int, list[int]] = {}
        for c in chosen:
            cells.setdefault(c // H, []).append(c % H)
        ex = sign * lens.patch(lm, x, src, metric, "attn.hook_z", "head", batch_size, base=b, start="layer",
                               layers=xl, cells=cells)
        mask = np.isfinite(ex)
        out[name] = np.where(mask, ex, ig)
        out[f"ig:{name}"] = ig
        out[f"exact:{name}"] = mask
    return out


def recall_at(ig: np.ndarray, exact: np.ndarray, k: int) -> float:
    """``|top_k(ranking) & top_k(exact)| / k`` with top = most negative effect (causal score = -effect)."""
    a = set(np.argsort(ig, axis=None, kind="stable")[:k].tolist())
    b = set(np.argsort(exact, axis=None, kind="stable")[:k].tolist())
    return len(a & b) / k


GRADIENTS = ("full", "direct")


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
    lens.count_cost(3.0, 1)  # a forward and a backward
    res = np.zeros((L, H))
    for l in range(L):
        delta = (cf_z[l] - clean_z[l]) * grads[l][0]  # [T, H*d]
        res[l] = delta.view(delta.shape[0], H, d).sum((0, 2)).detach().cpu().numpy()
    return res
