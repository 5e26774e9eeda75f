"""Hallucination events: generated object tokens that are not in the image, with their prefix,
step, and a preferred alternative; grounded object tokens as controls.

An event is teacher-forceable: prompt + ``prefix_ids`` reproduces the model's state when it
emitted ``token`` (tested), so every causal study runs on one forward pass of that input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
import torch

from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT, caption
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.scenes import Split


@dataclass
class Event:
    """One generated object token: hallucinated (``kind="hallucinated"``) or grounded (control)."""

    image: int  # index in the split
    kind: str
    token: str  # the object word emitted
    preferred: str | None  # the alternative a faithful model should prefer (a present, unmentioned object)
    step: int  # generation step of the token (0 = first generated token)
    prefix: str  # caption text generated before the token
    cue: str | None  # the present object cueing the hallucination (co-occurrence partner), if any
    caption: str
    # the model's top-rated present, unmentioned object was the cue itself, so the next-rated one
    # (or none) was taken: the counterfactual removes the cue, and must not remove the preferred object
    cue_was_top_preferred: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def find_events(lm: LoadedModel, split: Split, limit: int | None = None, prompt: str = DEFAULT_CAPTION_PROMPT,
                max_new_tokens: int = 32, progress: bool = True, captions: list[str] | None = None) -> pd.DataFrame:
    """Events from greedy captions of ``split`` (first ``limit`` images).

    Preferred alternative: among present objects not yet mentioned, *other than the cue*, the
    one the model rates highest at that step; events with none are kept with ``preferred=None``
    (counted, not used by studies that need a preferred token).  Cue: a present strong partner
    of the hallucinated object, else a present object of its group.  The cue is never the
    preferred object, since the counterfactual image removes the cue: were it also the
    preferred object, removing it would lower ``log p(preferred)`` and *raise* the margin.
    ``cue_was_top_preferred`` marks the events where the cue would have been the top choice.
    """
    world = split.world
    n = len(split) if limit is None else min(limit, len(split))
    images = [split.image(i) for i in range(n)]
    if captions is None:
        captions = caption(lm, images, prompt, max_new_tokens=max_new_tokens, progress=progress)
    classes = set(world.classes)
    tok = lm.tokenizer
    builder = PromptBuilder(lm.processor)
    rows = []
    for i, cap in enumerate(captions[:n]):
        scene = split.scenes[i]
        present = scene.name_set
        ids = tok(cap, add_special_tokens=False)["input_ids"]
        words = tok.convert_ids_to_tokens(ids)
        mentioned: list[str] = []
        obj_steps = [j for j, w in enumerate(words) if w in classes]
        logp = None
        if any(w not in present for w in words if w in classes):
            logp = _step_logprobs(lm, builder, images[i], prompt, ids)
        for j in obj_steps:
            w = words[j]
            kind = "grounded" if w in present else "hallucinated"
            pref = None
            cue = None
            cue_top = False
            if kind == "hallucinated":
                partners = [p for p in world.partners.get(w, []) if p in present]
                g = world.group_of(w)
                group = [o for o in sorted(present) if g is not None and world.group_of(o) == g]
                cue = (partners or group or [None])[0]
                cands = sorted(c for c in present if c not in mentioned)
                scores = {c: float(logp[j, tok.convert_tokens_to_ids(c)]) for c in cands}
                if cands:
                    cue_top = max(cands, key=lambda c: scores[c]) == cue
                cands = [c for c in cands if c != cue]
                if cands:
                    pref = max(cands, key=lambda c: scores[c])
            rows.append(Event(i, kind, w, pref, j, tok.convert_tokens_to_string(words[:j]) if j else "", cue, cap,
                              cue_top).to_dict())
            mentioned.append(w)
    return pd.DataFrame(rows, columns=list(Event.__dataclass_fields__))


def _step_logprobs(lm: LoadedModel, builder: PromptBuilder, image, prompt: str, ids: list[int]) -> torch.Tensor:
    """Teacher-forced log-probabilities ``[len(ids), V]``: row j predicts token j."""
    inputs = builder.inputs([image], [prompt], lm.image_size)
    full = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
    with torch.no_grad():
        logits = lm.model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=inputs["pixel_values"]).logits
    P = inputs["input_ids"].shape[1]
    return logits[0, P - 1 : P - 1 + len(ids)].float().log_softmax(-1)


def event_inputs(lm: LoadedModel, split: Split, ev: dict, counterfactual: bool = False) -> dict:
    """Model inputs that end right before the event's token (prompt + prefix).

    ``counterfactual``: the same scene rendered without the cue object (every other pixel
    identical), same text, so positions align.
    """
    from dleaf_analysis.scenes import render

    scene = split.scenes[ev["image"]]
    if counterfactual:
        if not ev.get("cue"):
            raise ValueError("this event has no cue object to remove")
        scene = scene.without(ev["cue"])
    image = render(split.world, scene)
    builder = PromptBuilder(lm.processor)
    inputs = builder.inputs([image], [DEFAULT_CAPTION_PROMPT], lm.image_size)
    prefix = lm.tokenizer(ev["prefix"], add_special_tokens=False)["input_ids"] if ev["prefix"] else []
    if prefix:
        extra = torch.tensor([prefix])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    return dict(inputs)


def logit_diff(logits: torch.Tensor, token_id: int, preferred_id: int) -> torch.Tensor:
    """``log p(token) - log p(preferred)`` at the last position: ``logits [B, T, V] -> [B]``."""
    lp = logits[:, -1].float().log_softmax(-1)
    return lp[:, token_id] - lp[:, preferred_id]
