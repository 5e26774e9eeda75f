"""Batches whose sequences hold different numbers of image tokens (LLaVA-NeXT anyres, mixed image
sizes): each method decodes every sequence as it would alone."""

import pytest
import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis.interventions import PAI, DLeaf, UniformFusion, image_columns
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.models.families.llava_next import tiny_llava_next_mixed


@pytest.fixture(scope="module")
def mixed():
    model, singles, batch = tiny_llava_next_mixed()
    counts = [int((s["input_ids"] == 79).sum()) for s in singles]
    assert counts[0] != counts[1], counts  # the point of the fixture
    return LoadedModel.wrap(model), singles, batch


def _decode(lm, method, inputs):
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        out, rec = method.decode(lm, inputs, **kw) if method is not None else (lm.model.generate(**inputs, **kw), None)
    log = list(rec.log) if rec is not None else []
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.scores, 1), log


@pytest.mark.parametrize("name,method", [("greedy", None), ("dleaf", DLeaf(k=0.0, gamma=1.0)),
                                         ("dleaf-image-fusion", DLeaf(k=0.0, gamma=1.0, fusion="image")),
                                         ("uniform", UniformFusion(gamma=1.0, head_selection="below-mean")), ("pai", PAI(alpha=1.0, layers=[0, 1]))])
def test_mixed_image_token_counts_decode_like_one_at_a_time(mixed, name, method):
    lm, singles, batch = mixed
    ids, scores, log = _decode(lm, method, batch)
    _, greedy_scores, _ = _decode(lm, None, batch)
    for i, single in enumerate(singles):
        s_ids, s_scores, s_log = _decode(lm, method, single)
        assert torch.equal(ids[i], s_ids[0]), name
        torch.testing.assert_close(scores[i], s_scores[0], rtol=1e-4, atol=1e-4)
        fired = sorted((r["step"], r["layer"], tuple(r["heads"])) for r in log if r["batch"] == i)
        assert fired == sorted((r["step"], r["layer"], tuple(r["heads"])) for r in s_log)
        if isinstance(method, DLeaf):
            assert fired, "D-LEAF never fired on this sequence: the comparison would be vacuous"
            assert {r["n_image"] for r in log if r["batch"] == i} == {int((single["input_ids"] == 79).sum())}
        if method is not None:  # the method changed something on this sequence
            assert (scores[i] - greedy_scores[i]).nan_to_num(0.0).abs().max() > 1e-4


def test_padded_image_columns_score_like_unpadded():
    torch.manual_seed(0)
    rows = [torch.softmax(torch.randn(4, 12), -1), torch.softmax(torch.randn(4, 12), -1)]
    img = torch.zeros(2, 12, dtype=torch.bool)
    img[0, 2:5] = True  # 3 image tokens
    img[1, 1:9] = True  # 8 image tokens
    cols, valid = image_columns(torch.stack(rows), img, with_valid=True)
    assert cols.shape == (2, 4, 8) and valid.sum(-1).tolist() == [3, 8]
    for b in range(2):
        alone = rows[b][None][..., img[b]]  # [1, H, n_b]
        for variant in D.LIAE_VARIANTS:
            torch.testing.assert_close(D.liae(cols, variant, valid)[b], D.liae(alone, variant)[0])
        for variant in D.IAF_VARIANTS:
            torch.testing.assert_close(D.iaf(cols, variant, valid)[b], D.iaf(alone, variant)[0])
