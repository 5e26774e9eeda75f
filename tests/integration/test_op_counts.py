"""Kernel launches per decoded token at LLaVA-1.5-7B depth (32 layers x 32 heads, 576 image tokens),
counted as non-view aten operators (``dleaf_analysis.profiling.count_ops``): the editors' per-layer
work is one fused operator per candidate layer (``interventions.fused``), so D-LEAF and uniform
fusion cost at most 1.10x eager greedy and PAI at most 1.05x -- on any hardware, since it counts
launches, not seconds.  The unfused step-by-step editor is the negative control."""

import numpy as np
import pytest
import torch

from dleaf_analysis import hooks
from dleaf_analysis.interventions import PAI, DLeaf, UniformFusion
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.models.tiny import tiny_llava15
from dleaf_analysis.profiling import count_ops


@pytest.fixture(scope="module")
def deep():
    model, processor = tiny_llava15(layers=32, hidden=64, heads=32)
    model.eval()
    lm = LoadedModel.wrap(model, processor)
    img = np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8)
    inputs = dict(PromptBuilder(processor).inputs([img], ["describe the image ."], 336))
    return lm, inputs


def _per_token(lm, inputs, method, n=6):
    kw = dict(do_sample=False, pad_token_id=lm.pad_token_id)
    counts = []
    for tokens in (1, 1 + n):
        with count_ops() as c, torch.no_grad():
            if method is None:
                lm.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
            else:
                method.generate(lm, inputs, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        counts.append(sum(c.values()))
    return (counts[1] - counts[0]) / n


def test_editors_cost_at_most_a_few_ops_per_layer(deep):
    lm, inputs = deep
    lm.model.set_attn_implementation("eager")
    eager = _per_token(lm, inputs, None)
    hooks.install(lm.model)
    ratios = {}
    for name, m in (("dleaf", DLeaf(k=0.0, gamma=1.0)), ("uniform", UniformFusion()), ("pai", PAI(alpha=1.0))):
        ratios[name] = _per_token(lm, inputs, m) / eager
    assert ratios["dleaf"] <= 1.10 and ratios["uniform"] <= 1.10, ratios
    assert ratios["pai"] <= 1.05, ratios
    # per candidate layer (30 of 32): at most 4 extra operators
    cand = len(DLeaf().candidate_layers(32))
    assert (ratios["dleaf"] - 1) * eager / cand <= 4, ratios


def test_the_counter_sees_an_unfused_editor(deep):
    """Negative control: the same work done op by op inside an editor is counted op by op."""
    from dleaf_analysis import diagnostics as D

    lm, inputs = deep
    hooks.install(lm.model)

    def unfused(pattern, ctx):
        row = pattern[:, :, -1, :]
        img = ctx.image_keys(row.shape[-1], row.device)
        a = row * img[:, None, :]
        _ = D.liae(a) + D.iaf(a).sum()
        return pattern

    with count_ops(editors_only=True) as c, torch.no_grad(), hooks.attach_editor(lm.model, unfused, inputs):
        lm.model(**inputs)
    assert sum(c.values()) >= 32 * 8, c  # every layer's editor shows its own ops
