"""`regime.attention_profile`, the instrument of two acceptance checks (image-attention slope, the
first-text sink): at the prefill step it equals transformers' own attention weights, and it sees a
planted sink of known size (a positive control for the sink check the shipped model fails)."""

import pytest
import torch

from dleaf_analysis import hooks
from dleaf_analysis.evaluation import regime
from dleaf_analysis.models.adapters import ModelAdapter


@pytest.fixture(scope="module")
def batch(embedded, dev_source):
    images = [dev_source.image(i) for i in range(2)]
    inputs = embedded.inputs(images, [dev_source.prompt] * 2)
    sink = regime.first_text_mask(embedded, inputs["input_ids"], inputs["attention_mask"])  # [B, P]
    return images, inputs, sink


def test_prefill_step_equals_transformers_attention_weights(embedded, dev_source, batch):
    images, inputs, sink = batch
    prof = regime.attention_profile(embedded, images, dev_source.prompt, max_new_tokens=4)
    first = prof[prof.step == 0].set_index(["layer", "item"]).sort_index()
    with torch.no_grad():
        out = embedded.model(**inputs, output_attentions=True)  # eager: [B, H, T, T] per layer
    img = ModelAdapter(embedded.model).image_mask(inputs["input_ids"]).float()[:, None]
    assert len(out.attentions) == embedded.model.config.text_config.num_hidden_layers
    for layer, att in enumerate(out.attentions):
        row = att[:, :, -1, :].float()  # the last prompt token's query, [B, H, T]
        for col, mask in (("image_mass", img), ("first_text_mass", sink.float()[:, None])):
            ref = (row * mask).sum(-1).mean(-1)
            got = torch.tensor(first.loc[layer, col].to_numpy(), dtype=ref.dtype)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_a_planted_sink_is_measured(embedded, dev_source, batch):
    """From layer 2 on, 40% of each query's attention is moved onto BOS + system prompt: the profile
    must report at least 40% there in every such layer, the check's share of sink layers is then 1.0,
    and layers 0-1 (not planted) are measured as without the plant at the prefill step."""
    images, _, sink = batch
    P, share = sink.shape[1], 0.4

    def plant(pattern: torch.Tensor, ctx: hooks.EditContext) -> torch.Tensor:
        if ctx.layer < 2:
            return pattern
        onto = torch.zeros_like(pattern[:, :, -1, :])
        onto[..., :P] = (sink.float() / sink.sum(-1, keepdim=True))[:, None].to(pattern)
        out = pattern.clone()
        out[:, :, -1, :] = (1 - share) * pattern[:, :, -1, :] + share * onto
        return out

    clean = regime.attention_profile(embedded, images, dev_source.prompt, max_new_tokens=8)
    with hooks.attach_editor(embedded.model, plant):
        planted = regime.attention_profile(embedded, images, dev_source.prompt, max_new_tokens=8)
    by_layer = regime.first_text_by_layer(planted).set_index("layer")["first_text_mass"]
    assert (by_layer.loc[2:] >= share - 1e-6).all(), by_layer
    assert float((by_layer.loc[2:] >= 0.2).mean()) == 1.0
    at0 = lambda p: p[(p.step == 0) & (p.layer < 2)].sort_values(["layer", "item"])["first_text_mass"].to_numpy()  # noqa: E731
    torch.testing.assert_close(torch.tensor(at0(planted)), torch.tensor(at0(clean)), atol=1e-6, rtol=0)
