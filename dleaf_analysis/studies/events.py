"""Hallucination events: generated object mentions that are not in the image, with their prefix,
step, token span and a preferred alternative; grounded object mentions as controls.

Mentions are located in the generated ids themselves (never by re-tokenising the decoded text):
each generated token covers the characters its decoding adds to the text, and a mention (the
source's matcher: CHAIR's rules on COCO, the class words on the scene world) covers the tokens
that overlap its characters -- its *span*, which may hold several sub-tokens.

The event token (``EVENT_TOKENS``, a named option):

- ``"first"`` (default): the first sub-token of the object word; the preferred alternative is
  ranked, and the margin ``log p(token) - log p(preferred)`` measured, on first sub-tokens;
- ``"span"``: the whole word: the log-probabilities of its sub-tokens summed (teacher-forced
  after the prefix); the preferred alternative is ranked by its own span's sum.

The causal maps measure the first sub-token's margin in both variants (one forward per
intervention); ``span`` changes which alternative is preferred and the recorded ``margin``.
An event is teacher-forceable: prompt + ``prefix_ids`` reproduces the model's state when it
emitted ``token_id`` (tested), so every causal study runs on one forward pass of that input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from dleaf_analysis.models.generation import caption_ids
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.sources import ImageSource

EVENT_TOKENS = ("first", "span")


@dataclass
class Event:
    """One generated object mention: hallucinated (``kind="hallucinated"``) or grounded (control)."""

    image: int  # position in the source (as selected)
    kind: str
    token: str  # the object mentioned (the source's canonical name)
    preferred: str | None  # the alternative a faithful model should prefer (a present, unmentioned object)
    step: int  # generation step of the first sub-token (0 = first generated token)
    prefix: str  # caption text generated before the mention's first sub-token
    cue: str | None  # the present object cueing the hallucination (co-occurrence partner), if any
    caption: str
    # the model's top-rated present, unmentioned object was the cue itself, so the next-rated one
    # (or none) was taken: the counterfactual removes the cue, and must not remove the preferred object
    cue_was_top_preferred: bool = False
    item: str = ""  # the source's stable key of the image
    word: str = ""  # the mention as written in the caption
    token_id: int = -1  # first sub-token of the mention (generated id at ``step``)
    span_end: int = -1  # the mention's tokens are generated ids [step, span_end)
    span_ids: list[int] = field(default_factory=list)
    preferred_id: int | None = None  # first sub-token of the preferred word in context
    prefix_ids: list[int] = field(default_factory=list)  # generated ids before ``step``
    margin: float | None = None  # log p(token) - log p(preferred) under the event-token variant

    def to_dict(self) -> dict:
        return asdict(self)


def word_ids(tokenizer, word: str) -> list[int]:
    """Token ids of ``word`` as it follows other text (after a space): ``tok("a " + word)`` minus
    ``tok("a")`` -- so that SentencePiece's word-initial pieces are the ones compared -- without a
    leading piece that is only the word boundary."""
    base = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a " + word, add_special_tokens=False)["input_ids"]
    ids = full[len(base):] if full[: len(base)] == base else tokenizer(word, add_special_tokens=False)["input_ids"]
    # a bare word-boundary piece (SentencePiece's lone "▁") is not part of the word: a mention's span
    # starts at its first piece with a character of the word, and so does the alternative
    while len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    return ids


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and, per token, the characters ``[start, end)`` its decoding
    adds (monotone; a token that adds nothing has an empty span)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ends = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    for k in range(len(ends) - 2, -1, -1):  # partial UTF-8 pieces can decode longer than their completion
        ends[k] = min(ends[k], ends[k + 1])
    ends = [min(e, len(text)) for e in ends]
    starts = [0] + ends[:-1]
    return text, list(zip(starts, ends))


def mention_spans(source: ImageSource, tokenizer, ids: list[int]) -> tuple[str, list[tuple]]:
    """Object mentions in generated ``ids``: ``(text, [(Mention, first_token, end_token)])``."""
    text, spans = token_char_spans(tokenizer, ids)
    out = []
    for m in source.mentions(text):
        toks = [k for k, (a, b) in enumerate(spans) if a < m.end and b > m.start]
        if toks:
            out.append((m, toks[0], toks[-1] + 1))
    return text, out


def find_events(lm: LoadedModel, source: ImageSource, limit: int | None = None, prompt: str | None = None,
                max_new_tokens: int | None = None, progress: bool = True,
                generated: list[list[int]] | None = None, event_token: str = "first") -> pd.DataFrame:
    """Events from greedy captions of the first ``limit`` images of ``source`` (or of the given
    ``generated`` ids).  Prompt and length: the source's (``source.prompt``, ``max_new_tokens``).

    Preferred alternative: among present objects not yet mentioned, *other than the cue* (and
    other than objects whose first sub-token is the event's own), the one the model rates highest
    at that step; events with none are kept with ``preferred=None`` (counted, not used by studies
    that need a preferred token).  Cue: :meth:`ImageSource.cue` (a removable present object that
    co-occurs with the hallucinated one).  The cue is never the preferred object, since the
    counterfactual image removes the cue: were it also the preferred object, removing it would
    lower ``log p(preferred)`` and *raise* the margin.  ``cue_was_top_preferred`` marks the events
    where the cue would have been the top choice.
    """
    if event_token not in EVENT_TOKENS:
        raise ValueError(f"unknown event token {event_token!r}; choose one of {EVENT_TOKENS}")
    prompt = prompt or source.prompt
    max_new_tokens = max_new_tokens or source.max_new_tokens
    n = len(source) if limit is None else min(limit, len(source))
    if generated is None:
        generated = caption_ids(lm, [source.image(i) for i in range(n)], prompt, max_new_tokens=max_new_tokens,
                                progress=progress)
    tok = lm.tokenizer
    rows = []
    for i, ids in enumerate(generated[:n]):
        text, found = mention_spans(source, tok, ids)
        cap = text.strip()
        present = source.objects(i)
        mentioned: list[str] = []
        logp = None
        if any(m.object not in present for m, _, _ in found):
            logp = _forward_logprobs(lm, source.image(i), prompt, ids)
        for m, j, e in found:
            kind = "grounded" if m.object in present else "hallucinated"
            ev = Event(i, kind, m.object, None, j, tok.decode(ids[:j], skip_special_tokens=True), None, cap,
                       item=source.key(i), word=m.word, token_id=int(ids[j]), span_end=e, span_ids=list(ids[j:e]),
                       prefix_ids=list(ids[:j]))
            if kind == "hallucinated":
                ev.cue = source.cue(i, m.object)
                cands = sorted(c for c in present if c not in mentioned and c != m.object)
                cand_ids = {c: word_ids(tok, source.object_word(c)) for c in cands}
                cands = [c for c in cands if cand_ids[c] and cand_ids[c][0] != ev.token_id]
                if event_token == "first":
                    scores = {c: float(logp[j, cand_ids[c][0]]) for c in cands}
                    own = float(logp[j, ev.token_id])
                else:
                    scores = {c: _span_logprob(lm, source.image(i), prompt, ids[:j], cand_ids[c]) for c in cands}
                    own = float(sum(logp[k, ids[k]] for k in range(j, e)))
                if cands:
                    ev.cue_was_top_preferred = max(cands, key=lambda c: scores[c]) == ev.cue
                cands = [c for c in cands if c != ev.cue]
                if cands:
                    ev.preferred = max(cands, key=lambda c: scores[c])
                    ev.preferred_id = int(cand_ids[ev.preferred][0])
                    ev.margin = own - scores[ev.preferred]
            rows.append(ev.to_dict())
            mentioned.append(m.object)
    return pd.DataFrame(rows, columns=list(Event.__dataclass_fields__))


def _forward_logprobs(lm: LoadedModel, image, prompt: str, ids: list[int]) -> torch.Tensor:
    """Teacher-forced log-probabilities ``[len(ids), V]``: row j predicts ``ids[j]``."""
    inputs = lm.inputs([image], [prompt], ids)
    P = inputs["input_ids"].shape[1] - len(ids)
    with torch.no_grad():
        logits = lm.model(**inputs).logits
    return logits[0, P - 1 : P - 1 + len(ids)].float().log_softmax(-1).cpu()


def _span_logprob(lm: LoadedModel, image, prompt: str, prefix_ids: list[int], span: list[int]) -> float:
    lp = _forward_logprobs(lm, image, prompt, list(prefix_ids) + list(span))
    j = len(prefix_ids)
    return float(sum(lp[j + k, t] for k, t in enumerate(span)))


def event_inputs(lm: LoadedModel, source: ImageSource, ev: dict, counterfactual: bool = False,
                 prefix: bool = True) -> dict:
    """Model inputs (on the model's device) that end right before the event's token: prompt +
    the generated ids before it (``prefix=False``: the prompt only).

    ``counterfactual``: the same image with the cue object removed (scene world: re-rendered
    without it; photos: its mask filled, see :mod:`dleaf_analysis.sources.fill`), same text, so
    positions align.
    """
    i = int(ev["image"])
    if counterfactual:
        if not ev.get("cue"):
            raise ValueError("this event has no cue object to remove")
        image = source.counterfactual(i, ev["cue"])
    else:
        image = source.image(i)
    ids = ev.get("prefix_ids")
    if ids is None or (len(ids) == 0 and ev.get("prefix")):  # an event table of an older version: text only
        ids = lm.tokenizer(ev["prefix"], add_special_tokens=False)["input_ids"] if ev.get("prefix") else []
    return lm.inputs([image], [source.prompt], [int(t) for t in ids] if prefix else None)


def logit_diff(logits: torch.Tensor, token_id: int, preferred_id: int) -> torch.Tensor:
    """``log p(token) - log p(preferred)`` at the last position: ``logits [B, T, V] -> [B]``."""
    lp = logits[:, -1].float().log_softmax(-1)
    return lp[:, token_id] - lp[:, preferred_id]
