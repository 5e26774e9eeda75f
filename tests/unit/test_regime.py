"""The regime measurements against a published reference: LLaVA-1.5-7B's released greedy captions
(OPERA's log) with CHAIR's ground truth -- 1.0% hallucinated at the first mention, about 22% from
the sixth on, 28% of mentions after every ground-truth object was named (the numbers the testbed's
acceptance checks were set from)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from dleaf_analysis.evaluation import regime
from dleaf_analysis.sources.coco_chair import CocoChair, read_captions
from conftest import REFERENCE_CAPTIONS


@pytest.fixture(scope="module")
def llava_table():
    sc = CocoChair.load()
    df = read_captions(REFERENCE_CAPTIONS / "opera__llava-1.5__greedy.jsonl")
    ment = lambda c: [SimpleNamespace(object=o, start=a) for o, a, _ in sc.mentions(c)]  # noqa: E731
    return regime.mention_table(list(df.caption), [sc.gt[int(i)] for i in df.image_id], ment)


def test_llava15_position_profile(llava_table):
    s = regime.position_summary(llava_table)
    assert s["rate_first"] == pytest.approx(1.004, abs=0.01)
    assert s["rate_6_plus"] == pytest.approx(22.245, abs=0.01)
    assert s["share_after_coverage"] == pytest.approx(27.897, abs=0.01)
    prof = regime.position_profile(llava_table, n_resamples=100).set_index("rank")
    assert prof.loc["6-8", "rate"] > 5 * prof.loc["1", "rate"]


def test_mention_table_hand_computed():
    m = lambda text: [SimpleNamespace(object=w, start=i) for i, w in enumerate(text.split()) if w in "cup fork knife"]  # noqa: E731
    t = regime.mention_table(["cup fork knife cup"], [{"cup", "fork"}], m)
    assert list(t["hallucinated"]) == [False, False, True, False]
    assert list(t["after_coverage"]) == [False, False, True, True]  # both present objects named before the 3rd


def test_mass_slope_recovers_a_planted_trend():
    rows = [(i, s, l, 0.6 - 0.002 * s + 0.01 * np.sin(i + l), 0.1) for i in range(20) for s in range(50) for l in range(2)]
    prof = pd.DataFrame(rows, columns=["item", "step", "layer", "image_mass", "first_text_mass"])
    out = regime.mass_slope(prof, n_resamples=200)
    assert out["slope_per_100_steps"] == pytest.approx(-0.2, abs=1e-6)
    assert out["ci_high"] < 0
    flat = prof.assign(image_mass=0.5 + 0.01 * np.random.default_rng(0).standard_normal(len(prof)))
    f = regime.mass_slope(flat, n_resamples=200)
    assert f["ci_low"] < 0 < f["ci_high"]  # no trend planted: the CI covers 0


def test_first_text_mask_covers_bos_and_the_whole_system_prompt(world):
    """The embedded system prompt itself contains the word ``user``: the mask must run to the user
    turn's ``user :``, i.e. BOS, ``system :`` and every word of the system prompt, and nothing after."""
    from dleaf_analysis.models.embedded import build_tokenizer

    tok = build_tokenizer(world)
    assert "user" in world.system_prompt.split()  # the case this test is about
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world.spec["caption_prompt"]}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = tok([text, text], return_tensors="pt", padding=True)
    ids, am = enc["input_ids"].clone(), enc["attention_mask"].clone()
    ids[1] = torch.cat([torch.full((2,), tok.pad_token_id), ids[1, :-2]])  # left padding on row 1
    am[1] = torch.cat([torch.zeros(2, dtype=am.dtype), am[1, :-2]])
    mask = regime.first_text_mask(SimpleNamespace(tokenizer=tok), ids, am)
    n_prefix = 1 + 2 + len(world.system_prompt.split())  # <s>, "system", ":", the prompt's words
    assert mask[0].tolist() == [True] * n_prefix + [False] * (ids.shape[1] - n_prefix)
    assert mask[1].tolist() == [False] * 2 + [True] * n_prefix + [False] * (ids.shape[1] - n_prefix - 2)
    words = tok.convert_ids_to_tokens(ids[0, mask[0]].tolist())
    assert words[-1] == world.system_prompt.split()[-1] and tok.convert_ids_to_tokens(int(ids[0, n_prefix])) == "user"


def test_first_text_mask_without_a_user_turn_is_the_first_real_token():
    tok = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1})
    ids = torch.tensor([[0, 1, 1], [1, 0, 1]])
    am = torch.tensor([[1, 1, 1], [0, 1, 1]])
    mask = regime.first_text_mask(SimpleNamespace(tokenizer=tok), ids, am)
    assert mask.tolist() == [[True, False, False], [False, True, False]]
