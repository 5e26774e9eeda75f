"""The oracle study: what would D-LEAF's correction do with perfect timing?

For each image, the greedy caption is teacher-forced, and at each of its object steps (the
first sub-token of every object mention) D-LEAF's fusion (its gamma, head selection and fusion
variant; decided from that step's own attention row) is applied *at that step only*, in a layer
set: each single layer, D-LEAF's candidate layers, and the layers D-LEAF actually fires at that
step (replayed with its own editor over the greedy prefix).  The new greedy token is read:

- at a hallucinated step: **fix** (now a present object), **swap** (another absent object),
  **unchanged** (the same token) or **other** (not an object word);
- at a grounded step: **harm** (now an absent object), **swap** (another present object),
  unchanged or other;

with the change of the greedy token's log-probability.  First-order prediction of D-LEAF's
CHAIR_i change: the fixes and harms of the *fired* layer sets (a step where nothing fires changes
nothing), as a change of hallucinated mentions over all mentions, next to the measured change
(D-LEAF's captions against greedy's on the same images, paired bootstrap).  A correction that
rarely fixes even when timed perfectly cannot help however good the trigger is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis import hooks
from dleaf_analysis.interventions import fuse_heads, image_columns
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.generation import caption_ids
from dleaf_analysis.studies.base import Study, register
from dleaf_analysis.studies.events import mention_spans, word_ids

OUTCOMES = ("fix", "swap", "harm", "unchanged", "other")


def first_token_objects(lm, source, classes) -> dict[int, str]:
    """First sub-token of each object word -> the object (ambiguous first tokens dropped)."""
    seen: dict[int, set] = {}
    for c in classes:
        ids = word_ids(lm.tokenizer, source.object_word(c))
        if ids:
            seen.setdefault(ids[0], set()).add(c)
    return {t: next(iter(cs)) for t, cs in seen.items() if len(cs) == 1}


class _StepCorrection:
    """Pattern editor: copy ``b`` gets D-LEAF's fusion on query row ``rows[b]`` in its layers ``sets[b]``."""

    def __init__(self, cfg, rows: list[int], sets: list[set[int]], img: torch.Tensor) -> None:
        self.cfg, self.rows, self.sets, self.img = cfg, rows, sets, img

    def __call__(self, pattern: torch.Tensor, ctx: hooks.EditContext) -> torch.Tensor:
        copies = [b for b, s in enumerate(self.sets) if ctx.layer in s]
        if not copies:
            return pattern
        pattern = pattern.clone()
        for b in copies:
            q = self.rows[b]
            row = pattern[b:b + 1, :, q, :]  # [1, H, K]
            a_img = image_columns(row.float(), self.img[None, : row.shape[-1]].to(row.device))
            iaf = D.iaf(a_img, self.cfg.iaf_variant)
            sel = self.cfg.select_heads(iaf)
            key = self.img[None, : row.shape[-1]].to(row.device) if self.cfg.fusion == "image" else None
            pattern[b:b + 1, :, q, :] = fuse_heads(row, sel, iaf.argmax(-1), self.cfg.gamma, key).to(pattern.dtype)
        return pattern


@register
class Oracle(Study):
    name = "oracle"
    description = ("D-LEAF's correction applied with perfect timing (only at hallucinated, or only at grounded object "
                   "steps of the teacher-forced greedy caption), per layer set: fix, swap and harm rates, the change of "
                   "the greedy token's log-probability, and the first-order prediction of D-LEAF's CHAIR_i change "
                   "next to the measured one.")
    uses_events = False
    figures = ("oracle_outcomes",)
    default_options = {"max_new_tokens": None, "copies": 16}

    def prepare(self, ctx) -> None:
        from dleaf_analysis.evaluation.runner import evaluate

        src = ctx.source
        kw = dict(lm=ctx.lm, seed=ctx.seed, progress=False, n_resamples=500)
        g = evaluate("chair", src, method="greedy", **kw)
        d = evaluate("chair", src, method="dleaf", method_config={k: v for k, v in ctx.config.dleaf.items()}, **kw)
        from dleaf_analysis.evaluation.chair import chair_paired

        ctx.extra["measured"] = chair_paired(g.details, d.details, n_resamples=1000, seed=ctx.seed)
        ctx.extra["n_mentions"] = int(g.details["n_mentions"].sum())
        ctx.extra["objects"] = first_token_objects(ctx.lm, src, src.classes if hasattr(src, "classes")
                                                   else sorted({o for i in range(len(src)) for o in src.objects(i)}))

    def units(self, ctx):
        return [(ctx.source.key(i), i) for i in range(len(ctx.source))]

    def unit(self, ctx, i: int) -> list[dict]:
        lm, src, cfg = ctx.lm, ctx.source, ctx.dleaf
        ad = ModelAdapter(lm.model)
        L = ad.n_layers
        ids = caption_ids(lm, [src.image(i)], src.prompt, max_new_tokens=ctx.options["max_new_tokens"] or
                          src.max_new_tokens, progress=False)[0]
        _, found = mention_spans(src, lm.tokenizer, ids)
        if not found:
            return [{"item": src.key(i), "image": i, "step": None}]
        gt = src.objects(i)
        prompt_inputs = lm.inputs([src.image(i)], [src.prompt])
        fired = {}
        for r in cfg.replay(lm, prompt_inputs, ids).log:
            fired.setdefault(r["step"], set()).add(r["layer"])
        inputs = lm.inputs([src.image(i)], [src.prompt], ids)
        P = prompt_inputs["input_ids"].shape[1]
        img = ad.image_mask(inputs["input_ids"])[0]
        cand = cfg.candidate_layers(L)
        sets = {f"L{l}": {l} for l in range(L)}
        sets["candidates"] = set(cand)
        jobs = []  # (step, object, hallucinated, set name, layers)
        for m, j, _ in found:
            for name, layers in list(sets.items()) + [("fired", fired.get(j, set()))]:
                jobs.append((j, m.object, m.object not in gt, name, layers))
        with torch.no_grad():
            base = lm.model(**inputs).logits[0].float().log_softmax(-1)  # [T, V]
        objects = ctx.extra["objects"]
        rows = []
        n = ctx.options["copies"]
        for s in range(0, len(jobs), n):
            chunk = jobs[s:s + n]
            todo = [c for c in chunk if c[4]]
            out_lp = {}
            if todo:
                rep = {k: v.repeat(len(todo), *([1] * (v.dim() - 1))) for k, v in inputs.items()}
                ed = _StepCorrection(cfg, [P - 1 + c[0] for c in todo], [set(c[4]) for c in todo], img)
                with torch.no_grad(), hooks.attach_editor(lm.model, ed, rep):
                    logits = lm.model(**rep).logits.float()
                for b, c in enumerate(todo):
                    out_lp[id(c)] = logits[b, P - 1 + c[0]].log_softmax(-1)
            for c in chunk:
                j, obj, hall, name, layers = c
                q = P - 1 + j
                lp = out_lp.get(id(c), base[q])
                new = int(lp.argmax())
                new_obj = objects.get(new)
                if new == ids[j]:
                    outcome = "unchanged"
                elif new_obj is None:
                    outcome = "other"
                elif hall:
                    outcome = "fix" if new_obj in gt else "swap"
                else:
                    outcome = "harm" if new_obj not in gt else "swap"
                rows.append({"item": src.key(i), "image": i, "step": j, "object": obj, "hallucinated": hall,
                             "layer_set": name, "layers": sorted(int(x) for x in layers), "new_token": new,
                             "outcome": outcome, "dlogp": float(lp[ids[j]] - base[q, ids[j]])})
        return rows

    def finalize(self, ctx, events, rows, summary):
        r = rows[rows["step"].notna()].drop(columns=["key"], errors="ignore") if len(rows) else rows
        table = []
        for (hall, name), g in r.groupby(["hallucinated", "layer_set"], sort=False):
            row = {"steps": "hallucinated" if hall else "grounded", "layer_set": name, "n_steps": len(g),
                   "mean_dlogp": float(g["dlogp"].mean())}
            row.update({f"{o}_rate": 100 * float((g["outcome"] == o).mean()) for o in OUTCOMES})
            table.append(row)
        table = pd.DataFrame(table)
        fired = r[r["layer_set"] == "fired"] if len(r) else r
        fixes = int(((fired["outcome"] == "fix") & fired["hallucinated"]).sum()) if len(fired) else 0
        harms = int(((fired["outcome"] == "harm") & ~fired["hallucinated"].astype(bool)).sum()) if len(fired) else 0
        n_mentions = (ctx.extra["n_mentions"] if ctx else summary.get("n_mentions")) or 0
        summary["n_mentions"] = n_mentions
        pred = 100 * (harms - fixes) / n_mentions if n_mentions else float("nan")
        pred_rows = [{"quantity": "predicted dCHAIR_i (first order, fired layers)", "value": pred, "ci_low": None,
                      "ci_high": None, "n": n_mentions, "fixes": fixes, "harms": harms}]
        if ctx is not None:
            m = ctx.extra["measured"].set_index("metric").loc["CHAIR_i"]
            pred_rows.append({"quantity": "measured dCHAIR_i (D-LEAF vs greedy)", "value": float(m["diff"]),
                              "ci_low": float(m["ci_low"]), "ci_high": float(m["ci_high"]), "n": int(m["n"]),
                              "fixes": None, "harms": None})
            summary["measured_dCHAIR_i"] = float(m["diff"])
        summary["predicted_dCHAIR_i"] = pred
        return {"oracle_steps": r, "oracle_summary": table, "prediction_summary": pd.DataFrame(pred_rows)}
