"""The DPO gradient-alignment check of the paper's Theorem 1, measured (docs/method.md).

For a hallucination event and each layer D-LEAF corrects at that step:

- ``x+``: the residual stream (decoder layer output) at the event's position, plain run;
- ``xD``: the same under D-LEAF's correction;
- ``x-``: the preferred embedding: the same position in the counterfactual run (cue removed);
- ``g = grad_x [log p(y_w | x) - log p(y_l | x)]`` at ``x+`` (``y_w`` preferred, ``y_l``
  hallucinated), proportional to minus the DPO gradient at ``pi = pi_ref``.

Reported: ``cos(xD - x+, g)``, ``cos(xD - x+, x- - x+)``, ``|xD - x-| / |x+ - x-|``, against a
null: fusing the same number of random heads toward a random head in the same layers.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pandas as pd
import torch
from scipy.stats import wilcoxon

from dleaf_analysis import diagnostics as D
from dleaf_analysis import hooks, lens
from dleaf_analysis.interventions import DLeaf, fuse_heads, image_columns
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.studies.base import Study, register
from dleaf_analysis.studies.events import event_inputs, logit_diff


def _resid(lm, inputs: dict, editor=None) -> list[torch.Tensor]:
    """Decoder-layer outputs at the last position, per layer ``[D]``."""
    adapter = ModelAdapter(lm.model)
    got = {}
    with ExitStack() as st:
        for l in range(adapter.n_layers):
            st.enter_context(lens.hook(lm.model, f"blocks.{l}.hook_resid_post",
                                       lambda h, l=l: got.__setitem__(l, h[0, -1].detach().clone())))
        if editor is not None:
            st.enter_context(hooks.attach_editor(lm.model, editor, inputs))
        with torch.no_grad():
            lm.model(**inputs)
    return [got[l] for l in range(adapter.n_layers)]


def forced_decoding_log(lm, inputs: dict, continuation_ids: list[int], cfg: DLeaf) -> list[dict]:
    """D-LEAF's own log over a teacher-forced decoding: the prompt (step 0), then each token of
    ``continuation_ids`` fed one at a time with the KV cache, exactly as ``generate`` steps, with
    D-LEAF's editor attached (its corrections apply to the later steps as in decoding).  One
    firing rule: the editor that decodes is the one that decides here."""
    return list(cfg.replay(lm, inputs, continuation_ids).log)


def fired_layers(lm, inputs: dict, prefix_ids: list[int], cfg: DLeaf) -> list[int]:
    """Layers D-LEAF corrects at the event's step (step ``len(prefix_ids)``) when decoding the
    event's prefix: read from D-LEAF's own log (:func:`forced_decoding_log`)."""
    step = len(prefix_ids)
    return sorted({r["layer"] for r in forced_decoding_log(lm, inputs, prefix_ids, cfg) if r["step"] == step})


def _fusion_editor(layers: list[int], img: torch.Tensor, gamma: float, cfg: DLeaf, rng: np.random.Generator | None):
    """D-LEAF's correction in ``layers`` on the last row; with ``rng``: the same number of
    randomly chosen heads fused toward a random other head (the null)."""
    def edit(pattern, ctx):
        if ctx.layer not in layers:
            return pattern
        row = pattern[:, :, -1, :]
        iaf = D.iaf(image_columns(row.float(), img[None, : row.shape[-1]]), cfg.iaf_variant)
        sel = cfg.select_heads(iaf)
        best = iaf.argmax(-1)
        if rng is not None:
            H = row.shape[1]
            k = int(sel.sum())
            b = int(rng.integers(H))
            others = [h for h in range(H) if h != b]
            pick = rng.choice(others, size=k, replace=False) if k else []
            sel = torch.zeros_like(sel)
            sel[0, list(pick)] = True
            best = torch.tensor([b], device=row.device)
        pattern = pattern.clone()
        key_img = img[None, : row.shape[-1]] if cfg.fusion == "image" else None
        pattern[:, :, -1, :] = fuse_heads(row, sel, best, gamma, key_img)
        return pattern
    return edit


def _grad_at(lm, inputs: dict, layer: int, win: int, lose: int) -> torch.Tensor:
    """``d [log p(win) - log p(lose)] / d x`` where ``x`` is layer ``layer``'s output at the last position."""
    holder = {}

    def leaf(hs):
        x = hs[:, -1].detach().requires_grad_(True)
        holder["x"] = x
        return torch.cat([hs[:, :-1], x[:, None]], 1)

    from dleaf_analysis.lens import frozen_parameters

    with lens.hook(lm.model, f"blocks.{layer}.hook_resid_post", leaf), torch.enable_grad(), \
            frozen_parameters(lm.model):
        m = -logit_diff(lm.model(**inputs).logits, lose, win).sum()  # log p(win) - log p(lose)
        (g,) = torch.autograd.grad(m, [holder["x"]])
    return g[0]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    return float((a @ b) / (na * nb)) if na > 0 and nb > 0 else float("nan")


def alignment(lm, inputs: dict, cf_inputs: dict, token_id: int, preferred_id: int, cfg: DLeaf,
              layers: list[int], n_null: int = 5, seed: int = 0) -> list[dict]:
    """Rows per (layer, run): run = "dleaf" or "null-i"."""
    adapter = ModelAdapter(lm.model)
    hooks.install(lm.model)
    img = adapter.image_mask(inputs["input_ids"])[0]
    x_plus = _resid(lm, inputs)
    x_minus = _resid(lm, cf_inputs)
    rng = np.random.default_rng(seed)
    runs = [("dleaf", None)] + [(f"null-{i}", rng) for i in range(n_null)]
    rows = []
    for name, r in runs:
        x_d = _resid(lm, inputs, _fusion_editor(layers, img, cfg.gamma, cfg, r))
        for l in layers:
            g = _grad_at(lm, inputs, l, preferred_id, token_id)
            dx = x_d[l] - x_plus[l]
            rows.append({
                "layer": l, "run": name, "null": name != "dleaf",
                "cos_update_grad": _cos(dx, g),
                "cos_update_to_preferred": _cos(dx, x_minus[l] - x_plus[l]),
                "distance_ratio": float((x_d[l] - x_minus[l]).norm() / (x_plus[l] - x_minus[l]).norm()),
                "update_norm": float(dx.norm()),
            })
    return rows


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per statistic: D-LEAF mean, null mean, and a one-sided Wilcoxon signed-rank test that
    D-LEAF aligns better than its paired null (greater cosines, smaller distance ratio)."""
    from dleaf_analysis.studies.localization import mean_ci

    out = []
    keys = ["event", "layer"]
    is_null = rows["null"].astype(bool)
    d = rows[~is_null].set_index(keys)
    nl = rows[is_null].groupby(keys).mean(numeric_only=True)
    for stat, better in (("cos_update_grad", "greater"), ("cos_update_to_preferred", "greater"), ("distance_ratio", "less")):
        both = d[[stat]].join(nl[[stat]], rsuffix="_null").dropna()
        if len(both) == 0:
            continue
        m, lo, hi = mean_ci(both[stat].to_numpy())
        mn, lon, hin = mean_ci(both[f"{stat}_null"].to_numpy())
        diff = both[stat] - both[f"{stat}_null"]
        p = wilcoxon(diff, alternative=better).pvalue if (diff != 0).any() else float("nan")
        out.append({"statistic": stat, "dleaf_mean": m, "dleaf_ci_low": lo, "dleaf_ci_high": hi,
                    "null_mean": mn, "null_ci_low": lon, "null_ci_high": hin, "n": len(both),
                    "alternative": better, "wilcoxon_p": float(p)})
    return pd.DataFrame(out)


@register
class DPOAlignment(Study):
    name = "dpo"
    description = ("Theorem 1, measured: does D-LEAF's correction move the residual stream along the DPO gradient "
                   "and toward the counterfactual (cue removed), more than fusing random heads in the same layers?")
    needs_cue = True
    figures = ("dpo_alignment",)

    def unit(self, ctx, ev: dict) -> list[dict]:
        inputs = event_inputs(ctx.lm, ctx.source, ev)
        cf = event_inputs(ctx.lm, ctx.source, ev, counterfactual=True)
        prompt_inputs = event_inputs(ctx.lm, ctx.source, ev, prefix=False)
        layers = fired_layers(ctx.lm, prompt_inputs, [int(t) for t in ev["prefix_ids"]], ctx.dleaf)
        if not layers:
            return [{"event": ev["key"], "fired": False}]
        rows = alignment(ctx.lm, inputs, cf, int(ev["token_id"]), int(ev["preferred_id"]), ctx.dleaf, layers,
                         seed=ctx.seed)
        return [{"event": ev["key"], "fired": True, **r} for r in rows]

    def finalize(self, ctx, events, rows, summary):
        fired = rows[rows["fired"].astype(bool)] if len(rows) else rows
        summary["n_events_fired"] = int(fired.event.nunique()) if len(fired) else 0
        summary["n_events_not_fired"] = int(rows[~rows["fired"].astype(bool)].event.nunique()) if len(rows) else 0
        kept = fired.drop(columns=["fired", "key"], errors="ignore")
        return {"events": events, "dpo": kept, "dpo_summary": summarize(kept) if len(kept) else pd.DataFrame()}
