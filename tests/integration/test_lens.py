"""The named hook points (``dleaf_analysis.lens``) against transformers' own outputs and against the
causal study's independent implementation of head patching."""

import copy

import numpy as np
import pytest
import torch

from dleaf_analysis import lens
from dleaf_analysis.interventions import HeadAblation
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.studies.events import logit_diff


@pytest.fixture(scope="module")
def inputs(embedded, dev_split):
    return dict(PromptBuilder(embedded.processor).inputs([dev_split.image(0)], ["describe the image . a photo of"],
                                                         embedded.image_size))


@pytest.fixture(scope="module")
def cached(hooked, inputs):
    return lens.run_with_cache(hooked, inputs)


def test_cache_matches_transformers_outputs(embedded, inputs, cached):
    logits, cache = cached
    ref_model = copy.deepcopy(embedded.model)
    ref_model.set_attn_implementation("eager")  # transformers' own eager attention, no hook point
    with torch.no_grad():
        ref = ref_model(**inputs, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)
    L = cache.n_layers
    for l in range(L):
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern"], ref.attentions[l], rtol=0, atol=1e-6)
    for l in range(L - 1):  # hidden_states[l + 1] is layer l's output (the last one is normed)
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_post"], ref.hidden_states[l + 1], rtol=0, atol=1e-5)
    assert cache.stack("attn.hook_pattern").shape[:2] == (L, 1)
    from dleaf_analysis.models.adapters import ModelAdapter

    img = ModelAdapter(embedded.model).image_mask(inputs["input_ids"])[0]
    assert cache.image_positions[0] == torch.nonzero(img).flatten().tolist() and len(cache.image_positions[0]) == 144


def test_z_and_result_are_consistent(hooked, cached):
    from dleaf_analysis.models.adapters import ModelAdapter

    _, cache = cached
    ad = ModelAdapter(hooked.model)
    for l in range(cache.n_layers):
        z = cache[f"blocks.{l}.attn.hook_z"]
        assert z.shape[2:] == (ad.n_heads, ad.head_dim)
        with torch.no_grad():
            out = ad.layers[l].self_attn.o_proj(z.flatten(-2))
        torch.testing.assert_close(out, cache[f"blocks.{l}.attn.hook_result"], rtol=0, atol=1e-5)


def test_hook_edits_like_head_ablation(hooked, inputs):
    def zero_head(z):
        z = z.clone()
        z[:, :, 2] = 0
        return z
    with lens.hook(hooked.model, "blocks.3.attn.hook_z", zero_head), torch.no_grad():
        got = hooked.model(**inputs).logits
    with HeadAblation(heads=[(3, 2)]).attach(hooked, inputs), torch.no_grad():
        ref = hooked.model(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with torch.no_grad():
        clean = hooked.model(**inputs).logits  # the hook is gone after the block
    assert (clean - got).abs().max() > 1e-4


def test_patch_head_equals_the_causal_studys_patching(hooked):
    """Head patching through the lens equals ``studies.causal``'s own implementation (its plain
    ``o_proj`` pre-hooks) on a real event; patching from the clean run itself changes nothing."""
    from dleaf_analysis.studies import causal
    from dleaf_analysis.sources import SceneSource
    from dleaf_analysis.studies.events import event_inputs, find_events

    dev_split = SceneSource.load("dev", limit=30)
    events = find_events(hooked, dev_split, progress=False)
    ev = events[(events.kind == "hallucinated") & events.preferred.notna() & events.cue.notna()].iloc[0].to_dict()
    tok = hooked.tokenizer.convert_tokens_to_ids
    t, p = tok(ev["token"]), tok(ev["preferred"])
    clean, cf = event_inputs(hooked, dev_split, ev), event_inputs(hooked, dev_split, ev, counterfactual=True)
    metric = lambda logits: logit_diff(logits, t, p)  # noqa: E731
    _, cf_cache = lens.run_with_cache(hooked, cf, names=lambda n: n.endswith("hook_z"))
    got = lens.patch_head(hooked, clean, cf_cache, metric)
    ref = causal.causal_maps(hooked, clean, t, p, cf, kinds=("patching",))["patch_head"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.abs(ref).max() > 1e-2  # the event has effects to agree on
    _, clean_cache = lens.run_with_cache(hooked, clean, names=lambda n: n.endswith("hook_z"))
    np.testing.assert_allclose(lens.patch_head(hooked, clean, clean_cache, metric), 0.0, atol=1e-5)
    layer = lens.patch_layer(hooked, clean, cf_cache, metric, point="attn.hook_z")
    assert layer.shape == (ref.shape[0],)
    np.testing.assert_allclose(layer, causal.causal_maps(hooked, clean, t, p, cf, kinds=("patching",))["patch_layer"],
                               rtol=0, atol=1e-5)


def test_unknown_names_are_refused(hooked, inputs):
    with pytest.raises(ValueError, match="unknown hook point"):
        lens.run_with_cache(hooked, inputs, names=["blocks.0.mlp.hook_post"])
    with pytest.raises(ValueError, match="unknown hook point"):
        with lens.hook(hooked.model, "blocks.99.attn.hook_z", lambda v: None):
            pass
