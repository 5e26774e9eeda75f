"""Adapters and the hook point on tiny random models of the real classes (LLaVA-1.5-shaped,
LLaVA-NeXT, Qwen2-VL, InstructBLIP), and clear errors for anything else."""

import pytest
import torch

from dleaf_analysis import hooks
from dleaf_analysis.models import ModelLoadError, load_model
from dleaf_analysis.models.adapters import ModelAdapter, UnsupportedModelError
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.models.families import FAMILIES
from dleaf_analysis.models.tiny import tiny_llava15

OTHER_CLASSES = {k: f.tiny_model for k, f in FAMILIES.items() if k != "llava" and f.tiny_model is not None}
from dleaf_analysis.tracing import trace_forward, trace_generation


@pytest.fixture(scope="module")
def llava15_dir(tmp_path_factory):
    return tiny_llava15(tmp_path_factory.mktemp("tiny") / "llava-1.5-tiny")


def test_llava15_shaped_directory_loads_and_traces(llava15_dir):
    lm = load_model(llava15_dir)
    ad = ModelAdapter(lm.model)
    assert lm.image_size == 336 and ad.n_layers == 2
    img = (torch.rand(336, 336, 3) * 255).to(torch.uint8).numpy()
    four = {"min_new_tokens": 4}  # a random model may end its caption at once
    c = trace_generation(lm, img, max_new_tokens=4, generate_kwargs=four)
    assert c.n_image == 576 and c.n_steps == 4
    h = trace_generation(lm, img, max_new_tokens=4, backend="hooks", generate_kwargs=four)
    torch.testing.assert_close(c.image_attn, h.image_attn, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OTHER_CLASSES))
def test_other_classes_hook_point_and_traces(name):
    model, inputs = OTHER_CLASSES[name]()
    ad = ModelAdapter(model)
    n_img = int(ad.image_mask(inputs["input_ids"]).sum())
    assert ad.n_layers == 2 and ad.n_heads == 4 and n_img > 0
    with torch.no_grad():
        ref = model(**inputs).logits  # the class's default attention
    lm = LoadedModel.wrap(model)
    f_nn = trace_forward(lm, None, inputs=inputs, continuation=None, backend="nnsight")
    with torch.no_grad():
        got = model(**inputs).logits  # now through the hook point
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    f_h = trace_forward(lm, None, inputs=inputs, backend="hooks")
    torch.testing.assert_close(f_nn.image_attn, f_h.image_attn, rtol=0, atol=1e-6)
    assert f_nn.image_attn.shape == (1, 2, 4, n_img)
    g = trace_generation(lm, None, inputs=inputs, max_new_tokens=3, backend="hooks")
    assert g.n_steps == 3
    torch.testing.assert_close(g.image_attn[0], f_h.image_attn[0], rtol=0, atol=1e-5)  # prefill row = forward row


def test_unsupported_class_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        ModelAdapter(m)
    with pytest.raises(UnsupportedModelError):
        hooks.install(m)


def test_unsupported_directory_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not supported; supported"):
        load_model(tmp_path)


def test_missing_and_broken_model_directories(tmp_path, llava15_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llava15_dir, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: 1000])
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(broken)
