"""D-LEAF and baselines: oracle computations, exact no-ops, KV-cache consistency, restoration,
and clear config errors."""

import json

import pytest
import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis import hooks
from dleaf_analysis.interventions import (
    PAI, VCD, ConfigError, DLeaf, HeadAblation, UniformFusion, fuse_heads, get_method, load_config, method_from_dict,
)
from dleaf_analysis.models.inputs import PromptBuilder


@pytest.fixture(scope="module")
def lm(hooked):
    return hooked


@pytest.fixture(scope="module")
def inputs(lm, dev_split):
    return PromptBuilder(lm.processor).inputs([dev_split.image(i) for i in range(4)], ["describe the image ."] * 4)


GEN = dict(max_new_tokens=20, do_sample=False)


def _greedy(lm, inputs):
    with torch.no_grad():
        return lm.model.generate(**inputs, **GEN, pad_token_id=lm.pad_token_id)


def _capture(lm, inputs, layer):
    got = {}
    h = hooks.patterns(lm.model)[layer].register_forward_hook(lambda m, i, o: got.setdefault("p", o.detach().clone()))
    with torch.no_grad():
        logits = lm.model(**inputs).logits
    h.remove()
    return got["p"], logits


def test_fuse_heads_hand_computed():
    row = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]]])  # [B=1, H=3, K=3]
    out = fuse_heads(row, torch.tensor([[True, False, False]]), torch.tensor([1]), gamma=0.25)
    assert out[0, 0].tolist() == pytest.approx([0.375, 0.425, 0.2])
    assert torch.equal(out[0, 1:], row[0, 1:])
    assert out.sum(-1)[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_dleaf_edit_equals_hand_computation(lm, inputs):
    layer = 3
    cfg = DLeaf(threshold="static", layers=[layer], gamma=0.6, head_selection="below-mean")
    before, _ = _capture(lm, inputs, layer)
    with cfg.attach(lm, inputs) as rec:
        after, _ = _capture(lm, inputs, layer)
    img = inputs["input_ids"] == lm.model.config.image_token_id
    for b in range(4):
        row = before[b, :, -1, :]  # [H, K]
        a_img = row[:, img[b]]
        iaf = D.iaf(a_img)  # image mass per head
        best = int(iaf.argmax())
        expect = row.clone()
        for h in range(row.shape[0]):
            if h != best and iaf[h] < iaf.mean():
                expect[h] = 0.4 * row[h] + 0.6 * row[best]
        torch.testing.assert_close(after[b, :, -1, :], expect, rtol=0, atol=1e-6)
        torch.testing.assert_close(after[b, :, :-1, :], before[b, :, :-1, :], rtol=0, atol=0)  # other rows untouched
    assert {r["layer"] for r in rec.log} == {layer} and len(rec.log) == 4


@pytest.mark.parametrize("cfg", [DLeaf(gamma=0.0, threshold="static"), DLeaf(layers=[]), UniformFusion(gamma=0.0),
                                 PAI(alpha=0.0), VCD(alpha=0.0, beta=0.0)], ids=lambda c: c.name)
def test_exact_noops(lm, inputs, cfg):
    ref = _greedy(lm, inputs)
    with torch.no_grad():
        got = cfg.generate(lm, inputs, **GEN, pad_token_id=lm.pad_token_id)
    assert torch.equal(got[:, : ref.shape[1]], ref)


def test_model_restored_after_intervention(lm, inputs):
    with torch.no_grad():
        before = lm.model(**inputs).logits
    for cfg in (DLeaf(threshold="static", gamma=1.0), PAI(alpha=2.0), HeadAblation(heads=[(2, 1)], mode="mean")):
        with cfg.attach(lm, inputs):
            with torch.no_grad():
                during = lm.model(**inputs).logits
        assert (during - before).abs().max() > 1e-4, cfg.name
    with torch.no_grad():
        after = lm.model(**inputs).logits
    assert torch.equal(before, after)
    assert lm.model._dleaf_editors == []


def test_dleaf_with_kv_cache_equals_recomputation_without_cache(lm, inputs):
    """Decode with the KV cache and the dynamic threshold; then recompute every step from
    scratch (no cache), re-applying the logged edits to every earlier row: same tokens."""
    one = {k: v[:1] for k, v in inputs.items()}
    cfg = DLeaf(gamma=0.8, k=0.0)  # k = 0: fires often
    with torch.no_grad():
        ids, rec = cfg.decode(lm, one, **GEN, pad_token_id=lm.pad_token_id)
    log = list(rec.log)
    assert len(log) > 3
    P = one["input_ids"].shape[1]
    seq = one["input_ids"]
    edits = {}
    for r in log:
        edits.setdefault(r["layer"], []).append((P - 1 + r["step"], r["heads"], r["best_head"]))

    def oracle(pattern, ctx):

        layer = ctx.layer
        pattern = pattern.clone()
        for q, heads, best in edits.get(layer, []):
            if q < pattern.shape[2]:
                row = pattern[:, :, q, :]
                sel = torch.zeros(1, row.shape[1], dtype=torch.bool)
                sel[0, heads] = True
                pattern[:, :, q, :] = fuse_heads(row, sel, torch.tensor([best]), cfg.gamma)
        return pattern

    with hooks.attach_editor(lm.model, oracle), torch.no_grad():
        for _ in range(ids.shape[1] - P):
            logits = lm.model(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=one["pixel_values"],
                              use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, ids)


def test_dleaf_changes_some_captions(lm, inputs):
    ref = _greedy(lm, inputs)
    with torch.no_grad():
        got = UniformFusion(gamma=1.0).generate(lm, inputs, **GEN, pad_token_id=lm.pad_token_id)
    assert not torch.equal(got[:, : ref.shape[1]], ref)


def test_pai_amplifies_image_attention(lm, inputs):
    before, _ = _capture(lm, inputs, 4)
    with PAI(alpha=1.0, layers=[4]).attach(lm, inputs):
        after, _ = _capture(lm, inputs, 4)
    img = (inputs["input_ids"] == lm.model.config.image_token_id)
    m0 = (before[:, :, -1] * img[:, None]).sum(-1)
    m1 = (after[:, :, -1] * img[:, None]).sum(-1)
    torch.testing.assert_close(m1, 2 * m0 / (1 + m0), rtol=1e-5, atol=1e-6)  # renormalised doubling
    torch.testing.assert_close(after[:, :, -1].sum(-1), torch.ones_like(m0))


def test_zero_head_ablation_equals_zero_pattern(lm, inputs):
    with HeadAblation(heads=[(2, 1), (4, 3)]).attach(lm, inputs), torch.no_grad():
        a = lm.model(**inputs).logits

    def zero(pattern, ctx):

        layer = ctx.layer
        if layer in (2, 4):
            pattern = pattern.clone()
            pattern[:, {2: 1, 4: 3}[layer]] = 0
        return pattern

    with hooks.attach_editor(lm.model, zero), torch.no_grad():
        b = lm.model(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_config_roundtrip_and_registry():
    cfg = DLeaf(gamma=0.7, threshold="bas", layers=[2, 3])
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert method_from_dict(d) == cfg
    assert get_method("pai", {"alpha": 0.3}).alpha == 0.3


@pytest.mark.parametrize("call,match", [
    (lambda: get_method("opera"), "choose one of"),
    (lambda: get_method("dleaf", {"gama": 0.5}), "valid keys"),
    (lambda: get_method("dleaf", {"gamma": 1.5}), r"gamma must be in \[0.0, 1.0\]"),
    (lambda: get_method("dleaf", {"threshold": "adaptive"}), "choose one of"),
    (lambda: DLeaf(layers=[9]).validate(n_layers=6), "out of range"),
    (lambda: method_from_dict({"gamma": 0.5}), "no 'method' key"),
])
def test_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{gamma: 0.5")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.json")


def test_head_selection_variants_hand_computed():
    iaf = torch.tensor([[0.5, 0.1, 0.3, 0.05]])  # best = head 0, mean = 0.2375
    assert DLeaf(head_selection="below-mean").select_heads(iaf).tolist() == [[False, True, False, True]]
    assert DLeaf(head_selection="bottom-k", bottom_k=1).select_heads(iaf).tolist() == [[False, False, False, True]]
    # below rho * best = 0.35 * 0.5 = 0.175
    assert DLeaf(head_selection="below-rho", rho=0.35).select_heads(iaf).tolist() == [[False, True, False, True]]
    assert DLeaf(head_selection="all").select_heads(iaf).tolist() == [[False, True, True, True]]


def test_running_seed_variants_at_step_zero(lm, dev_split):
    q = PromptBuilder(lm.processor).inputs([dev_split.image(i) for i in range(4)], ["is there a dog in the image ?"] * 4)
    steps = {}
    for seed in ("prefill-last", "prefill-rows"):
        cfg = DLeaf(k=0.0, running_seed=seed)
        with torch.no_grad():
            _, rec = cfg.decode(lm, q, max_new_tokens=2, do_sample=False, pad_token_id=lm.pad_token_id)
        steps[seed] = {r["step"] for r in rec.log}
    assert 0 not in steps["prefill-last"]  # no history at the first step: cannot fire
    assert 0 in steps["prefill-rows"]  # seeded by the prompt rows: can correct a one-token answer
