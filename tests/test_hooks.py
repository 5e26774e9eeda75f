"""The attention hook point reproduces eager attention, stays causal, works with the KV cache,
and edits through it change the model and are undone."""

import copy

import pytest
import torch

from dleaf_analysis import hooks
from dleaf_analysis.models.inputs import PromptBuilder


@pytest.fixture(scope="module")
def model_and_inputs(embedded, dev_split):
    model = copy.deepcopy(embedded.model)
    inputs = PromptBuilder(embedded.processor).inputs([dev_split.image(0), dev_split.image(1)],
                                                      ["describe the image .", "is there a dog in the image ?"])
    return model, inputs


def _eager(model):
    model.set_attn_implementation({k: "eager" for k in model.config.sub_configs})


def test_hook_point_reproduces_eager_logits(model_and_inputs):
    model, inputs = model_and_inputs
    _eager(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    hooks.install(model)
    assert hooks.is_installed(model)
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_hook_point_is_causal(model_and_inputs):
    model, inputs = model_and_inputs
    hooks.install(model)
    seen = {}
    h = hooks.patterns(model)[2].register_forward_hook(lambda m, i, o: seen.setdefault("p", o.detach()))
    with torch.no_grad():
        base = model(**inputs).logits
        changed = dict(inputs)
        ids = inputs["input_ids"].clone()
        ids[:, -1] = 5  # change only the last token
        changed["input_ids"] = ids
        after = model(**changed).logits
    h.remove()
    p = seen["p"]  # [B, H, T, T]
    assert torch.triu(p[1, 0], diagonal=1).abs().max() == 0  # no attention to the future (unpadded row)
    pad = int((inputs["attention_mask"][0] == 0).sum())
    assert pad > 0 and p[0, :, pad:, :pad].abs().max() == 0  # real tokens never attend to left padding
    torch.testing.assert_close(after[1, :-1], base[1, :-1])  # earlier positions unaffected
    torch.testing.assert_close(after[0, pad:-1], base[0, pad:-1])
    assert not torch.allclose(after[:, -1], base[:, -1])


def test_generation_with_kv_cache_matches_eager(model_and_inputs):
    model, inputs = model_and_inputs
    _eager(model)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    hooks.install(model)
    shapes = []
    h = hooks.patterns(model)[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    h.remove()
    assert torch.equal(got, ref)
    T = inputs["input_ids"].shape[1]
    assert shapes[0][2] == T and shapes[1][2:] == (1, T + 1)  # prefill, then one query per step


def test_editor_changes_output_and_is_removed(model_and_inputs):
    model, inputs = model_and_inputs
    hooks.install(model)
    with torch.no_grad():
        base = model(**inputs).logits

    def uniform(pattern, layer):
        if layer != 3:
            return pattern
        causal = (pattern > 0).float()
        return causal / causal.sum(-1, keepdim=True)

    with hooks.attach_editor(model, uniform):
        with torch.no_grad():
            edited = model(**inputs).logits
    with torch.no_grad():
        restored = model(**inputs).logits
    assert (edited - base).abs().max() > 1e-3
    torch.testing.assert_close(restored, base, rtol=0, atol=0)


def test_sdpa_is_refused_with_a_message(model_and_inputs):
    model, _ = model_and_inputs
    m = copy.deepcopy(model)
    m.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="sdpa.*eager"):
        hooks.check_attention_readable(m)
    with pytest.raises(RuntimeError, match="not installed"):
        hooks.patterns(m)
    hooks.install(m)  # switching to the hook point is the fix
    hooks.check_attention_readable(m)
