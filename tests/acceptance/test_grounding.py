"""The shipped embedded model is grounded (issue 10): where attention falls inside the image
decides what it says.  Its card's acceptance checks (issue 20) hold except its known failures, and a
fresh, smaller measurement with the package's own functions agrees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dleaf_analysis.evaluation.grounding import image_token_embeddings, within_image_cosine
from dleaf_analysis.interventions import ImageAttentionProbe
from dleaf_analysis.model_card import acceptance
from dleaf_analysis.paths import EMBEDDED_MODEL_DIR
from dleaf_analysis.scenes.render import patch_labels
from dleaf_analysis.scenes.world import Scene, SceneObject


_CARD = json.loads((EMBEDDED_MODEL_DIR / "model_card.json").read_text())
_CHECKS = list(acceptance(_CARD["metrics"])["check"])
# The shipped model's known failures (its card and issue 20 report them). Strict: a check that starts
# to pass, or a new failure, turns the suite red.
KNOWN_FAILURES = {
    "hallucination rate at mentions >= 6 over mention 1 (x, dev)",
    "mentions after every present object was named (%, dev)",
    "layers costing >= 10 recall points under an all-head fault (count; >= 2 beyond layer 1)",
    "layers after layer 1 where BOS + system prompt take >= 20% of attention (share)",
}


def test_the_card_holds_every_acceptance_check():
    assert len(_CHECKS) == 15 and KNOWN_FAILURES <= set(_CHECKS)
    prev = json.loads((EMBEDDED_MODEL_DIR / "previous_model.json").read_text())
    assert list(acceptance(prev["metrics"])["check"]) == _CHECKS  # the old model measured on every check
    assert prev["weights_hash"] != _CARD["weights_hash"]


@pytest.mark.parametrize("check", [pytest.param(c, marks=pytest.mark.xfail(
    strict=True, reason="a known failure of the shipped model (MODEL_CARD.md, issue 20)")) if c in KNOWN_FAILURES
    else c for c in _CHECKS])
def test_card_acceptance_check(check):
    acc = acceptance(_CARD["metrics"]).set_index("check")
    assert acc.loc[check, "passes"], acc.loc[check].to_dict()


def test_uniform_image_attention_collapses_recall(embedded):
    from dleaf_analysis.evaluation.grounding import probe_recall

    df = probe_recall(embedded, "dev", limit=40, kinds=("uniform",), progress=False).set_index("probe")
    assert df.loc["greedy", "recall"] >= 60
    assert df.loc["uniform", "d_recall"] <= -30, df


def test_image_tokens_are_far_from_copies_of_each_other(embedded, dev_split):
    """Measured afresh on the dev images of the fixture: the tokens of one image are not near-copies
    (centred cosine at most 0.5, the acceptance target), in agreement with the card's measurement on
    300 images."""
    emb = image_token_embeddings(embedded, dev_split.images())
    assert emb.shape[1] == 144
    cos = within_image_cosine(emb, centred=True)
    assert cos <= 0.5 and abs(cos - _CARD["metrics"]["grounding"]["cosine_within_centred"]) < 0.1, cos


def test_probe_editor_keeps_mass_and_text_columns(embedded):
    """On a random pattern: image mass per text row is kept, text columns and image-token query
    rows are untouched, and ``single`` puts all of the mass on one image column."""
    from dleaf_analysis import hooks
    from dleaf_analysis.models.adapters import ModelAdapter

    tok_id = ModelAdapter(embedded.model).image_token_id
    ids = torch.tensor([[1, 5, tok_id, tok_id, tok_id, tok_id, 7, 8]])
    inputs = {"input_ids": ids}
    pattern = torch.rand(1, 2, 8, 8).softmax(-1)
    img = (ids == tok_id)[0]
    for kind in ("uniform", "shuffle", "single"):
        probe = ImageAttentionProbe(kind=kind)
        got = {}
        with probe.attach(embedded, inputs):
            ed = embedded.model._dleaf_editors[-1]
            got["p"] = ed(pattern.clone(), 0)
        hooks.install(embedded.model)
        out = got["p"]
        text_rows = ~img
        torch.testing.assert_close(out[..., text_rows, :][..., img].sum(-1), pattern[..., text_rows, :][..., img].sum(-1))
        torch.testing.assert_close(out[..., ~img], pattern[..., ~img])
        torch.testing.assert_close(out[:, :, img], pattern[:, :, img])
        if kind == "uniform":
            a = out[0, 0, 7][img]
            assert torch.allclose(a, a.mean().expand_as(a))
        if kind == "single":
            assert int((out[0, 0, 7][img] > 0).sum()) == 1


def test_patch_labels_by_hand(world):
    # one 16-px object at (16, 8): covers patch columns 2-3 and rows 1-2 of the 8-px grid
    name = world.classes[0]
    sc = Scene(seed=0, objects=(SceneObject(name, 16, 8, 16),), clutter=(), background=(100, 100, 100), template=0)
    lab = patch_labels(world, sc, 8).reshape(world.image_size // 8, -1)
    from dleaf_analysis.scenes.render import glyph_mask

    cover = glyph_mask(world.spec["classes"][name]["shape"], 16).reshape(2, 8, 2, 8).transpose(0, 2, 1, 3).mean((2, 3))
    expected = np.zeros_like(lab)
    expected[1:3, 2:4] = np.where(cover >= 0.25, 1, 0)
    assert (lab == expected).all()
