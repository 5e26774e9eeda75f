"""Grounding probes: can *where* a model looks inside the image change what it says?

Three measurements, reported in the embedded model's card and asserted by its tests:

- ``probe_recall``: recall and CHAIR_s on a split under each
  :class:`~dleaf_analysis.interventions.ImageAttentionProbe` (image attention made uniform,
  shuffled across image positions, or put on a single image token, at the same mass, in every
  layer and head), against greedy decoding on the same images;
- ``token_cosines``: mean cosine similarity between two different image tokens of the same
  image (the language model's input embeddings of the image, i.e. the projector output), and,
  for reference, between tokens of different images.  Raw cosines are dominated by the offset
  that every image token shares (the mean token), so the acceptance probe uses the cosine of
  the *centred* tokens (the mean token over the images subtracted): near-copies stay near 1
  after centring, tokens about their own patches do not;
- ``patch_probe``: a linear (multinomial logistic) probe from one image token to the object
  class of its own patch, fitted on some images and scored on others, against chance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dleaf_analysis.interventions import PROBE_KINDS
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.scenes import Split
from dleaf_analysis.scenes.render import patch_labels


def image_token_embeddings(lm: LoadedModel, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The language model's input embeddings of the image tokens, ``[N, P, D]`` (projector output)."""
    builder = PromptBuilder(lm.processor)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pix = builder.pixel_values(torch.from_numpy(images[i : i + batch_size]))
            feats = lm.model.get_image_features(pixel_values=pix)
            feats = getattr(feats, "pooler_output", feats)
            if isinstance(feats, (list, tuple)):
                feats = torch.stack(list(feats))
            out.append(feats.float().cpu())
    return torch.cat(out)


def within_image_cosine(emb: torch.Tensor, centred: bool = True) -> float:
    """Mean cosine similarity over pairs of distinct tokens of the same image; ``emb [N, P, D]``.
    ``centred``: subtract the mean token over all images and positions first."""
    x = emb.float()
    if centred:
        x = x - x.reshape(-1, x.shape[-1]).mean(0)
    x = torch.nn.functional.normalize(x, dim=-1)
    sim = x @ x.transpose(1, 2)  # [N, P, P]
    P = sim.shape[-1]
    off = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)
    return float((off / (P * (P - 1))).mean())


def between_image_cosine(emb: torch.Tensor, centred: bool = True) -> float:
    """Mean cosine similarity between tokens of *different* images (image ``i`` vs ``i + 1``)."""
    x = emb.float()
    if centred:
        x = x - x.reshape(-1, x.shape[-1]).mean(0)
    x = torch.nn.functional.normalize(x, dim=-1)
    return float((x[:-1] @ x[1:].transpose(1, 2)).mean())


def token_cosines(emb: torch.Tensor) -> dict:
    """Within- and between-image cosines of image tokens, raw and centred."""
    return {f"{w}_{c}": f(emb, centred=(c == "centred"))
            for w, f in (("within", within_image_cosine), ("between", between_image_cosine)) for c in ("raw", "centred")}


def within_image_variance_share(emb: torch.Tensor) -> float:
    """Share of the total variance of image tokens that lies within images (1: tokens of an
    image differ as much as tokens of different images; 0: an image's tokens are copies)."""
    x = emb.float()
    total = x.reshape(-1, x.shape[-1]).var(0, unbiased=False).sum()
    within = x.var(1, unbiased=False).sum(-1).mean()
    return float(within / total)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, steps: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression by L-BFGS (deterministic)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def _tokens_and_labels(lm: LoadedModel, split: Split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(n, len(split))
    emb = image_token_embeddings(lm, np.stack([split.image(i) for i in range(n)]))  # [n, P, D]
    patch = lm.model.config.vision_config.patch_size
    labels = torch.from_numpy(np.stack([patch_labels(split.world, split.scenes[i], patch) for i in range(n)]))
    if labels.shape[1] != emb.shape[1]:
        raise ValueError(f"{emb.shape[1]} image tokens but {labels.shape[1]} patches; is this the embedded model?")
    return emb.reshape(-1, emb.shape[-1]), labels.reshape(-1)


def patch_probe(lm: LoadedModel, fit: Split, score: Split, n_fit: int = 2000, n_score: int = 300) -> dict:
    """Linear probe from each image token to its own patch's label (0 = background, 1 + class).

    Fitted on the first ``n_fit`` images of ``fit`` (e.g. the train split) and scored on the
    first ``n_score`` images of ``score`` (e.g. dev).  Returns accuracy over all patches and over
    object patches only, each with its chance level (the majority label's share of the scored
    patches), and the numbers of patches.
    """
    x_tr, y_tr = _tokens_and_labels(lm, fit, n_fit)
    x_te, y_te = _tokens_and_labels(lm, score, n_score)
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    lin = _fit_logistic((x_tr - mu) / sd, y_tr, len(score.world.classes) + 1)
    with torch.no_grad():
        pred = lin((x_te - mu) / sd).argmax(-1)
    obj = y_te > 0

    def chance(y: torch.Tensor) -> float:
        return float(torch.bincount(y).max() / len(y))

    return {
        "accuracy_all": float((pred == y_te).float().mean()),
        "chance_all": chance(y_te),
        "accuracy_object_patches": float((pred[obj] == y_te[obj]).float().mean()),
        "chance_object_patches": chance(y_te[obj]),
        "n_test_patches": int(len(y_te)),
        "n_test_object_patches": int(obj.sum()),
    }


def probe_recall(lm: LoadedModel, split: str = "dev", limit: int | None = None, kinds: tuple[str, ...] = PROBE_KINDS,
                 seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Greedy captions under each image-attention probe; one row per kind (and ``greedy``) with
    CHAIR_s, recall, and the change of each against greedy on the same images (points)."""
    from dleaf_analysis.evaluation.runner import evaluate

    rows = []
    for kind in ("greedy",) + tuple(kinds):
        method, cfg = ("greedy", None) if kind == "greedy" else ("probe", {"kind": kind, "seed": seed})
        res = evaluate("chair", split, lm, method=method, method_config=cfg, limit=limit, seed=seed,
                       n_resamples=200, progress=progress)
        rows.append({"probe": kind, "CHAIR_s": res.metric("CHAIR_s"), "recall": res.metric("recall")})
    df = pd.DataFrame(rows)
    df["d_recall"] = df["recall"] - df.loc[0, "recall"]
    df["d_CHAIR_s"] = df["CHAIR_s"] - df.loc[0, "CHAIR_s"]
    return df


def grounding_report(lm: LoadedModel, split_name: str = "dev", limit: int | None = None, n_probe_images: int = 300,
                     n_fit_images: int = 2000, progress: bool = True) -> dict:
    """Every grounding measurement of the model card, JSON-ready (probe recall on ``split_name``;
    token statistics on its first ``n_probe_images`` images; the patch probe fitted on the
    train split and scored on ``split_name``)."""
    from dleaf_analysis.scenes import load_split

    split = load_split(split_name, limit=max(n_probe_images, limit or 0))
    n = min(n_probe_images, len(split))
    emb = image_token_embeddings(lm, np.stack([split.image(i) for i in range(n)]))
    return {
        "split": split_name,
        "probe_recall": probe_recall(lm, split_name, limit=limit, progress=progress).to_dict(orient="records"),
        **{f"cosine_{k}": v for k, v in token_cosines(emb).items()},
        "within_image_variance_share": within_image_variance_share(emb),
        "patch_probe": patch_probe(lm, load_split("train", limit=n_fit_images, verify=False), split,
                                   n_fit=n_fit_images, n_score=n),
    }
