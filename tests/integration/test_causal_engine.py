"""The patching engine of the causal maps: copies that start at their layer over the cached clean
layer inputs, last-row corrections as one step over the clean KV cache, and the attribution ranking
verified by exact patching -- against full-sequence forwards of every copy (the reference), with
their cost in forward-equivalents."""

import numpy as np
import pytest
import torch

from dleaf_analysis import lens
from dleaf_analysis.models.tiny import synthetic_event
from dleaf_analysis.studies import causal


@pytest.fixture(scope="module")
def event():
    """A random LLaVA-1.5 half LLaVA-1.5-7B's depth (16 layers x 16 heads; narrow, 112 px:
    64 image tokens), a clean and a counterfactual image that differ in one region, and a token pair."""
    return synthetic_event(16, 16, prompt="describe the image .")


@pytest.fixture(scope="module")
def reference(event):
    """Every map by full-sequence forwards of every copy (today's engine), with its cost."""
    lm, inputs, cf, t, p = event
    with lens.cost_meter() as cost:
        maps = causal.causal_maps(lm, inputs, t, p, cf, engine="input")
    return maps, cost


@pytest.fixture(scope="module")
def layer_engine(event):
    lm, inputs, cf, t, p = event
    with lens.cost_meter() as cost:
        maps = causal.causal_maps(lm, inputs, t, p, cf, engine="layer")
    return maps, cost


def test_layer_engine_equals_full_forwards(layer_engine, reference):
    fast, fast_cost = layer_engine
    ref, ref_cost = reference
    for name in ("head_zero", "head_mean", "layer_zero", "correct_layer", "correct_head", "patch_head",
                 "patch_head_reverse", "patch_layer", "attribution_head"):
        scale = max(np.abs(ref[name]).max(), 1e-3)
        np.testing.assert_allclose(fast[name], ref[name], rtol=0, atol=2e-3 * scale, err_msg=name)
        assert np.abs(ref[name]).max() > 0 or name.startswith("correct"), name  # effects to agree on
    assert fast_cost["forward_equivalents"] <= 0.45 * ref_cost["forward_equivalents"], (fast_cost, ref_cost)


def test_attribution_ranking_verified_by_exact_patching(event, layer_engine, reference):
    lm, inputs, cf, t, p = event
    exact = layer_engine[0]
    ref_cost = reference[1]
    with lens.cost_meter() as cost:
        ranked = causal.causal_maps(lm, inputs, t, p, cf, head_ranking="attribution",
                                    ranking_options={"top_fraction": 0.1, "random_fraction": 0.05, "seed": 0})
    for name in causal.HEAD_PATCH_MAPS:
        mask = ranked[f"exact:{name}"]
        assert 0.1 <= mask.mean() <= 0.25, (name, mask.mean())  # top 10% plus a 5% random sample
        np.testing.assert_allclose(ranked[name][mask], exact[name][mask], rtol=0, atol=1e-5)  # exact where verified
        np.testing.assert_allclose(ranked[name][~mask], ranked[f"ig:{name}"][~mask])  # the estimate elsewhere
        top = np.argsort(ranked[f"ig:{name}"], axis=None)[: int(mask.sum() * 0.6)]
        assert mask.ravel()[top].all()  # the ranking's top cells are the verified ones
    assert cost["forward_equivalents"] <= 0.25 * ref_cost["forward_equivalents"], (cost, ref_cost)


def test_midpoint_ig_is_exact_for_a_linear_metric(event):
    """IG's completeness on a function linear in the patched head: the estimate equals exact patching."""
    lm, inputs, cf, t, p = event
    metric = lambda logits: logits[:, -1, t] * 0 + 1.0  # noqa: E731  constant: both must be 0
    ig = lens.integrated_gradients(lm, inputs, lambda v, l, h: torch.zeros_like(v[:, h]), metric)
    np.testing.assert_allclose(ig, 0.0, atol=1e-6)


def test_recall_at_hand_computed():
    a = np.array([[-3.0, -1.0], [0.5, -2.0]])
    b = np.array([[-2.0, 0.1], [-1.0, -2.5]])
    assert causal.recall_at(a, b, 1) == 0.0  # top cells (0, 0) and (1, 1) differ
    assert causal.recall_at(a, b, 2) == 1.0  # {(0,0), (1,1)} both
