"""Worked examples behind the paper's figures, as tidy tables (``dleaf_analysis.figures`` only plots them).

- :func:`dleaf_example` (Figure 1): one test decoding, LIAE per step and layer, D-LEAF's running
  threshold and where it fires, and the greedy and D-LEAF captions;
- :func:`ambiguous_captions` (Figure 2): greedy, uniform (PAI) and D-LEAF captions of
  partner-absent scenes where greedy hallucinates;
- :func:`correction_rates` (Figure 3): how often D-LEAF corrected each (layer, head) at steps that
  emitted a hallucinated vs a grounded object token;
- :func:`liae_by_token_type` (Figure 5): LIAE per layer of every generated token, by token type;
- :func:`attention_grid`: one step's image attention over the patch grid, best head and a
  corrected head before and after the fusion.

Hallucinated words are marked ``[word]`` in the ``*_marked`` caption columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dleaf_analysis.evaluation.chair import words
from dleaf_analysis.interventions import DLeaf, fuse_heads, get_method
from dleaf_analysis.models import caption
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.settings import tuned_config
from dleaf_analysis.sources import ImageSource, SceneSource
from dleaf_analysis.tracing import trace_generation

TOKEN_TYPES = ("real object", "hallucinated object", "non-object")


def token_type(token: str, present: frozenset | set, classes: set) -> str:
    """``real object`` / ``hallucinated object`` / ``non-object`` for one generated word."""
    if token not in classes:
        return "non-object"
    return "real object" if token in present else "hallucinated object"


def mark_hallucinated(text: str, present: set, classes: set, upper: bool = False) -> str:
    """The caption with each object word absent from the image in brackets (``[WORD]`` if ``upper``)."""
    return " ".join(f"[{w.upper() if upper else w}]" if w in classes and w not in present else w
                    for w in text.split())


def mark_mentions(text: str, source: ImageSource, present: set, upper: bool = False) -> str:
    """The caption with each mention (the source's matcher) of an object absent from the image in
    brackets (``[WORD]`` if ``upper``); on the scene world the same as :func:`mark_hallucinated`."""
    out = text
    for m in sorted(source.mentions(text), key=lambda m: -m.start):
        if m.object not in present:
            w = text[m.start:m.end]
            out = out[:m.start] + f"[{w.upper() if upper else w}]" + out[m.end:]
    return out


def _source(source: ImageSource | None, split: str, n_images: int | None) -> ImageSource:
    return source.limit(n_images) if source is not None else SceneSource.load(split, limit=n_images)


def _captions(lm, source: ImageSource, decode=None) -> list[str]:
    imgs = [source.image(i) for i in range(len(source))]
    return caption(lm, imgs, source.prompt, max_new_tokens=source.max_new_tokens, progress=False, decode=decode)


def running_threshold(liae: torch.Tensor, k: float) -> torch.Tensor:
    """``mu + k sd`` of each layer over the steps before each step (``liae [S, L] -> [S, L]``; NaN at
    step 0): the threshold of D-LEAF's ``running`` rule, so ``liae > threshold`` exactly where
    ``liae-z > k``."""
    S = liae.shape[0]
    csum = torch.cumsum(liae, 0)
    csq = torch.cumsum(liae * liae, 0)
    n = torch.arange(1, S + 1, dtype=liae.dtype).view(-1, 1)
    mu = csum / n
    sd = (csq / n - mu**2).clamp_min(0).sqrt()
    thr = torch.full_like(liae, float("nan"))
    thr[1:] = mu[:-1] + k * sd[:-1]
    return thr


def dleaf_example(lm: LoadedModel, n_images: int = 100, split: str = "test", source: ImageSource | None = None,
                  tuned_file=None) -> pd.DataFrame:
    """The first image of ``split`` (or of ``source``) whose D-LEAF caption has strictly fewer hallucinated objects than
    its greedy caption (``example`` says whether one was found among the first ``n_images``).
    Rows: ``step, token, layer, liae, threshold, fired``; LIAE of the greedy trace, with D-LEAF's
    running threshold on the same steps (its rule applied to the greedy decoding, identical to
    D-LEAF's own decisions up to its first correction)."""
    data = _source(source, split, n_images)
    cfg = DLeaf(**tuned_config("dleaf", lm.weights_hash, tuned_file))
    greedy = _captions(lm, data)
    dleaf = _captions(lm, data, decode=cfg.generate)

    def hallucinated(c: str, i: int) -> set:
        return {m.object for m in data.mentions(c) if m.object not in data.objects(i)}

    removed = [i for i in range(len(data)) if hallucinated(dleaf[i], i) < hallucinated(greedy[i], i)]
    pick = removed[0] if removed else 0
    cache = trace_generation(lm, data.image(pick), prompt=data.prompt, max_new_tokens=data.max_new_tokens,
                             backend="hooks")
    liae = cache.liae(cfg.liae_variant).float()  # [S, L]
    S, L = liae.shape
    # D-LEAF's own decisions on the greedy decoding (its editor replayed without correcting)
    inputs = lm.inputs([data.image(pick)], [data.prompt])
    dec = pd.DataFrame(type(cfg).from_dict({**cfg.to_dict(), "gamma": 0.0}).replay(
        lm, inputs, list(cache.tokens[:-1]), decisions=True).decisions)
    thr = {(int(r.step), int(r.layer)): (float(r.threshold), bool(r.fired)) for r in dec.itertuples()}
    rows = [{"step": st, "token": cache.token_strs[st], "layer": layer, "liae": float(liae[st, layer]),
             "threshold": thr.get((st, layer), (float("nan"), False))[0],
             "fired": thr.get((st, layer), (float("nan"), False))[1]}
            for st in range(S) for layer in range(L)]
    df = pd.DataFrame(rows)
    present = set(data.objects(pick))
    df["image"] = pick
    df["example"] = "D-LEAF removed a hallucinated object" if removed else \
        f"no test image among the first {len(data)} where D-LEAF removed a hallucinated object"
    df["greedy_caption"] = greedy[pick]
    df["dleaf_caption"] = dleaf[pick]
    df["greedy_marked"] = mark_mentions(greedy[pick], data, present)
    df["dleaf_marked"] = mark_mentions(dleaf[pick], data, present)
    df["present"] = ",".join(sorted(present))
    df["k"] = cfg.effective_k
    return df


def ambiguous_captions(lm: LoadedModel, n_images: int = 100, methods=("greedy", "pai", "dleaf"),
                       n_examples: int = 3, source: ImageSource | None = None, tuned_file=None) -> pd.DataFrame:
    """Captions by each method of up to ``n_examples`` partner-absent scenes (a strong partner of a
    present object is absent; or images of ``source``) where greedy hallucinates, preferring
    images where D-LEAF differs from greedy.  Rows: ``image, method, caption, marked,
    n_hallucinated, present``; ``attrs["images"]``: ``{image: picture}``."""
    data = _source(source, "test-partner-absent", n_images)
    caps = {m: _captions(lm, data, decode=get_method(m, tuned_config(m, lm.weights_hash, tuned_file)).generate)
            for m in methods}

    def n_hall(c, i):
        return sum(m.object not in data.objects(i) for m in data.mentions(c))

    cand = [i for i in range(len(data)) if n_hall(caps["greedy"][i], i)]
    cand.sort(key=lambda i: (caps["dleaf"][i] == caps["greedy"][i], i))
    rows = []
    for i in cand[:n_examples]:
        present = set(data.objects(i))
        for m, cs in caps.items():
            rows.append({"image": i, "method": m, "caption": cs[i],
                         "marked": mark_mentions(cs[i], data, present, upper=True),
                         "n_hallucinated": n_hall(cs[i], i), "present": ",".join(sorted(present))})
    df = pd.DataFrame(rows, columns=["image", "method", "caption", "marked", "n_hallucinated", "present"])
    df.attrs["images"] = {i: data.image(i) for i in cand[:n_examples]}
    return df


def correction_rates(details: pd.DataFrame, log: pd.DataFrame, classes) -> pd.DataFrame:
    """Per (token type, layer, head): how often D-LEAF corrected the head at the steps that emitted
    a hallucinated / grounded object token, divided by the number of such steps.

    ``details``: the per-caption CHAIR details of a D-LEAF evaluation (``image, caption,
    gt_objects``); ``log``: its intervention log (``item, step, layer, heads``); ``classes``: the
    object words, or a mapping from every object word (plurals too) to its object."""
    to_obj = dict(classes) if isinstance(classes, dict) else {c: c for c in classes}
    types: dict[tuple[int, int], str] = {}
    for r in details.itertuples():
        gt = set(r.gt_objects)
        for s, w in enumerate(words(r.caption)):
            if w in to_obj:
                types[(int(r.image), s)] = "hallucinated object" if to_obj[w] not in gt else "grounded object"
    n_steps = pd.Series(list(types.values())).value_counts()
    rows = [{"token_type": types[(int(r.item), int(r.step))], "layer": int(r.layer), "head": int(h)}
            for r in log.itertuples() if (int(r.item), int(r.step)) in types for h in r.heads]
    counts = pd.DataFrame(rows, columns=["token_type", "layer", "head"]).value_counts().rename("corrections")
    layers = sorted(set(log["layer"])) if len(log) else []
    heads = sorted({h for hs in log["heads"] for h in hs}) if len(log) else []
    grid = pd.MultiIndex.from_product([["hallucinated object", "grounded object"], layers, heads],
                                      names=["token_type", "layer", "head"])
    out = counts.reindex(grid, fill_value=0).reset_index()
    out["n_steps"] = out["token_type"].map(n_steps).fillna(0).astype(int)
    out["rate"] = out["corrections"] / out["n_steps"].clip(lower=1)
    return out


def liae_by_token_type(lm: LoadedModel, n_images: int = 100, split: str = "test",
                       source: ImageSource | None = None) -> pd.DataFrame:
    """LIAE per layer of every generated token of the greedy captions of ``split`` (or
    ``source``), with its ``token_type``: every sub-token of an object mention (located in the
    generated ids) is a real or hallucinated object token, the others non-object tokens.  Rows:
    those of ``AttentionCache.liae_frame`` plus ``image, token_type``."""
    from dleaf_analysis.studies.events import mention_spans

    data = _source(source, split, n_images)
    frames = []
    for i in range(len(data)):
        c = trace_generation(lm, data.image(i), prompt=data.prompt, max_new_tokens=data.max_new_tokens, backend="hooks")
        f = c.liae_frame()
        _, found = mention_spans(data, lm.tokenizer, list(c.tokens))
        types = ["non-object"] * c.n_steps
        present = data.objects(i)
        for m, a, b in found:
            for k in range(a, min(b, c.n_steps)):
                types[k] = "real object" if m.object in present else "hallucinated object"
        f["image"] = i
        f["token_type"] = [types[s] for s in f["step"]]
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def attention_grid(lm: LoadedModel, split: str = "test", image: int = 0, source: ImageSource | None = None) -> pd.DataFrame:
    """Image attention over the patch grid at one step of one greedy decoding: the candidate
    layer (2 and above) with the highest mean LIAE, its step of highest LIAE; the head of highest
    IAF ("best head"), and the head of lowest IAF before and after D-LEAF's fusion at gamma 1.
    Rows: ``panel, y, x, attention`` (normalised per panel) plus ``layer, step, token, head``;
    ``attrs["image"]`` is the image."""
    data = _source(source, split, image + 1)
    img = data.image(image)
    c = trace_generation(lm, img, prompt=data.prompt, max_new_tokens=data.max_new_tokens, backend="hooks")
    layer = int(c.liae()[:, 2:].mean(0).argmax()) + 2
    step = int(c.liae()[:, layer].argmax())
    a = c.image_attn[step, layer]  # [H, n]
    iaf = a.sum(-1)
    best = int(iaf.argmax())
    sel = DLeaf().select_heads(iaf[None])[0]
    worst = int(iaf.argmin())
    after = fuse_heads(a[None], sel[None], iaf.argmax()[None], 1.0)[0]
    side = int(np.sqrt(c.n_image))
    rows = []
    for label, vec in (("best head", a[best]), ("corrected head, before", a[worst]),
                       ("corrected head, after (gamma = 1)", after[worst])):
        grid = (vec / vec.sum().clamp_min(1e-12)).reshape(side, side).numpy()
        rows += [{"panel": label, "y": y, "x": x, "attention": float(grid[y, x]), "layer": layer, "step": step,
                  "token": c.token_strs[step], "head": best if label == "best head" else worst}
                 for y in range(side) for x in range(side)]
    df = pd.DataFrame(rows)
    df.attrs["image"] = img
    return df
