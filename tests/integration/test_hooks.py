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

    def uniform(pattern, ctx):

        layer = ctx.layer
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


# -- the hook point is exact for the text models a LLaVA checkpoint may carry ----------------------

def _llava_with_text(text_cfg, seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    img = text_cfg.vocab_size - 1
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_id=img,
                                                      vision_feature_layer=-1)).eval()
    ids = torch.tensor([[1, 5, 6] + [img] * 4 + list(range(7, 20))])  # 20 tokens: longer than the windows
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 28, 28)}


def _text_configs() -> dict:
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)  # GQA: 2 key/value heads for 4 query heads
    return {
        "gemma2-softcap-sliding": (Gemma2Config(**common, head_dim=8, attn_logit_softcapping=0.02, sliding_window=4,
                                                query_pre_attn_scalar=8),
                                   {"attn_logit_softcapping": None, "sliding_window": 1000}),
        "mistral-sliding": (MistralConfig(**common, sliding_window=4), {"sliding_window": 1000}),
        "qwen2-sliding": (Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1),
                          {"sliding_window": 1000}),
    }


@pytest.mark.parametrize("name", sorted(_text_configs()))
def test_hook_point_is_exact_for_softcapping_sliding_windows_and_gqa(name):
    import copy

    text, features = _text_configs()[name]
    model, inputs = _llava_with_text(text)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(**inputs).logits
    hooks.install(model)
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # each feature changes the logits on these inputs, so the parity above could have failed
    for attr, off in features.items():
        t2 = copy.deepcopy(text)
        setattr(t2, attr, off)
        other, _ = _llava_with_text(t2)
        other.load_state_dict(model.state_dict())
        other.set_attn_implementation("eager")
        with torch.no_grad():
            assert (other(**inputs).logits - ref).abs().max() > 1e-3, f"{attr} has no effect on this test's inputs"


def test_attention_options_it_cannot_honour_are_refused():
    from dleaf_analysis.models.adapters import UnsupportedModelError

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        hooks.dleaf_attention_forward(torch.nn.Module(), q, q, q, None, 0.5, s_aux=torch.zeros(2))


# -- the prefill keeps the fast kernel where only the last query row is read -----------------------

def test_prompt_rows_last_gives_the_last_row_and_the_same_outputs(embedded, dev_split):
    builder = PromptBuilder(embedded.processor)
    inputs = dict(builder.inputs([dev_split.image(i) for i in range(4)], ["describe the image ."] * 4,
                                 embedded.image_size))
    seen = []
    pat0 = hooks.install(embedded.model)[0]
    h = pat0.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            ref = embedded.model(**inputs).logits
            with hooks.prompt_rows(embedded.model, "last"):
                got = embedded.model(**inputs).logits
            after = embedded.model(**inputs).logits
    finally:
        h.remove()
    T = inputs["input_ids"].shape[1]
    assert seen == [(4, 4, T, T), (4, 4, 1, T), (4, 4, T, T)]  # the mode ends with the block
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["greedy", "dleaf", "uniform", "pai"])
def test_methods_with_sdpa_prefill_decode_like_the_eager_prefill(embedded, dev_split, method, monkeypatch):
    """Tokens and D-LEAF's firings are those of the all-rows-eager path; logits agree to 1e-4 at the
    first step.  (The reference forces ``prompt_rows = "all"``, the first version's path.)"""
    from dleaf_analysis.interventions import Method, get_method
    from dleaf_analysis.settings import tuned_config

    builder = PromptBuilder(embedded.processor)
    inputs = dict(builder.inputs([dev_split.image(i) for i in range(8)], ["describe the image ."] * 8,
                                 embedded.image_size))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=embedded.pad_token_id, output_scores=True,
              return_dict_in_generate=True)
    m = get_method(method, tuned_config(method, embedded.weights_hash))
    assert m.prompt_rows == "last"
    fast, rec = m.decode(embedded, inputs, **kw)
    fast_log = [(r["batch"], r["step"], r["layer"], tuple(r["heads"])) for r in rec.log]
    monkeypatch.setattr(type(m), "prompt_rows", property(lambda self: "all"))
    ref, rec = m.decode(embedded, inputs, **kw)
    ref_log = [(r["batch"], r["step"], r["layer"], tuple(r["heads"])) for r in rec.log]
    assert torch.equal(fast.sequences, ref.sequences)
    assert fast_log == ref_log
    torch.testing.assert_close(fast.scores[0], ref.scores[0], rtol=0, atol=1e-4)


def test_methods_that_read_prompt_rows_keep_them():
    from dleaf_analysis.interventions import DLeaf, ImageAttentionProbe

    assert DLeaf(running_seed="prefill-rows").prompt_rows == "all"
    assert ImageAttentionProbe().prompt_rows == "all"
    assert DLeaf(running_seed="prefill-rows", threshold="static").prompt_rows == "last"
