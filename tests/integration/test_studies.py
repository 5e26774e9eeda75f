"""Causal studies on the embedded model: events reproduce under teacher forcing, maps match
unbatched references, attribution tracks exact patching, small versions of every study run,
and bad cases (no events, foreign output directory) are reported, not crashed on."""

import json

import numpy as np
import pytest
import torch

from dleaf_analysis.sources import SceneSource

from dleaf_analysis.scenes import load_split
from dleaf_analysis.studies import causal
from dleaf_analysis.studies.events import event_inputs, find_events, logit_diff
from dleaf_analysis.studies import NoEventsError, run_study
from dleaf_analysis.sweeps import SweepMismatchError


@pytest.fixture(scope="module")
def split():
    return SceneSource.load("dev", limit=40)


@pytest.fixture(scope="module")
def events(embedded, split):
    return find_events(embedded, split, progress=False)


@pytest.fixture(scope="module")
def event(events):
    h = events[(events.kind == "hallucinated") & events.preferred.notna() & events.cue.notna()]
    return h.iloc[0].to_dict()


def test_events_reproduce_under_teacher_forcing(embedded, split, events):
    assert (events.kind == "hallucinated").sum() > 0 and (events.kind == "grounded").sum() > 0
    for ev in events.head(12).to_dict(orient="records"):
        inputs = event_inputs(embedded, split, ev)
        with torch.no_grad():
            nxt = int(embedded.model(**inputs).logits[0, -1].argmax())
        assert nxt == ev["token_id"]
        assert split.world.object_words[embedded.tokenizer.convert_ids_to_tokens(nxt)] == ev["token"]
        assert (ev["token"] in split.objects(ev["image"])) == (ev["kind"] == "grounded")


def test_preferred_and_cue_are_present_objects(split, events):
    h = events[events.kind == "hallucinated"]
    for ev in h.to_dict(orient="records"):
        present = split.objects(ev["image"])
        if isinstance(ev["preferred"], str):
            assert ev["preferred"] in present and ev["preferred"] not in ev["prefix"].split()
        if isinstance(ev["cue"], str):
            assert ev["cue"] in present


def test_batched_maps_equal_one_at_a_time(embedded, split, event):
    t, p = int(event["token_id"]), int(event["preferred_id"])
    inputs = event_inputs(embedded, split, event)
    cf = event_inputs(embedded, split, event, counterfactual=True)
    maps = causal.causal_maps(embedded, inputs, t, p, cf)
    from dleaf_analysis.interventions import HeadAblation

    with torch.no_grad():
        base = float(logit_diff(embedded.model(**inputs).logits, t, p))
    assert maps["m_clean"] == pytest.approx(base, abs=1e-5)
    for l, h in [(0, 0), (3, 2), (7, 1)]:
        with HeadAblation(heads=[(l, h)]).attach(embedded, inputs), torch.no_grad():
            m = float(logit_diff(embedded.model(**inputs).logits, t, p))
        assert maps["head_zero"][l, h] == pytest.approx(m - base, abs=1e-4)
    L, H = 8, 4
    assert maps["patch_layer"].shape == (L,) and maps["patch_head"].shape == (L, H)
    assert np.isfinite(maps["attribution_head"]).all()


def test_attribution_tracks_exact_patching(embedded, split, events):
    h = events[(events.kind == "hallucinated") & events.preferred.notna() & events.cue.notna()]
    a, e = [], []
    for ev in h.head(4).to_dict(orient="records"):
        maps = causal.causal_maps(embedded, event_inputs(embedded, split, ev), int(ev["token_id"]), int(ev["preferred_id"]),
                                  event_inputs(embedded, split, ev, counterfactual=True), kinds=("patching",))
        a.append(maps["attribution_head"].ravel())
        e.append(maps["patch_head"].ravel())
    from scipy.stats import spearmanr

    rho = spearmanr(np.concatenate(a), np.concatenate(e)).statistic
    assert rho > 0.6, rho  # the target at full size is 0.8; the README reports the measured value


@pytest.mark.parametrize("study", ["ablation", "patching", "localization", "dpo", "trigger", "oracle", "leverage"])
def test_small_studies_run_and_resume(tmp_path, embedded, study):
    from dleaf_analysis.studies import get_study

    r = run_study(study, "dev", limit=8, out=tmp_path, lm=embedded, progress=False, max_units=2)
    if get_study(study).uses_events:
        assert r.summary["n_hallucinated"] > 0
    lines = (tmp_path / study / "results.jsonl").read_text().splitlines()
    again = run_study(study, "dev", limit=8, out=tmp_path, lm=embedded, progress=False, max_units=2)  # nothing redone
    assert (tmp_path / study / "results.jsonl").read_text().splitlines() == lines
    assert json.loads((tmp_path / study / "summary.json").read_text()) == json.loads(json.dumps(again.summary, default=float))
    if study == "localization":
        s = r.tables["localization_summary"]
        assert {"liae", "image-mass", "row-entropy", "all-layers", "random"} <= set(s.detector)
        allx = s[(s.detector == "all-layers") & (s.metric == "spearman")]
        assert (allx["mean"] == 0).all()  # cannot rank: no information
        assert all("`liae`" in v and "`liae-z`" in v and "layer profile" in v for v in r.summary["verdict"])
    if study == "trigger":
        from dleaf_analysis.studies.trigger import TOKEN_TYPES

        by_type = r.tables["firing_by_type"].set_index("trigger")
        assert "dleaf" in by_type.index and "liae" in by_type.index and set(TOKEN_TYPES) <= set(by_type.columns)
        steps = r.tables["steps"]
        assert len(steps) and set(steps["type"]) <= set(TOKEN_TYPES) and steps["dleaf_fired"].isin([0, 1, True, False]).all()
        assert 0 <= r.summary["dleaf_firing_rate"] <= 1
    if study == "oracle":
        t = r.tables["oracle_summary"]
        assert "candidates" in set(t["layer_set"]) and "grounded" in set(t["steps"])
        rates = t[[c for c in t.columns if c.endswith("_rate")]].sum(1)
        assert np.allclose(rates, 100.0)  # every step has one outcome
        q = r.tables["prediction_summary"].set_index("quantity")
        assert len(q) == 2 and np.isfinite(r.summary["measured_dCHAIR_i"])
    if study == "leverage":
        t = r.tables["leverage_summary"]
        assert t["layer"].tolist() == [0, 1]  # max_units=2: the first two layers
        assert (t["drecall_low"] <= t["drecall"]).all() and (t["drecall"] <= t["drecall_high"]).all()
    if study == "dpo":
        if len(r.tables["dpo"]):
            assert set(r.tables["dpo_summary"].statistic) == {"cos_update_grad", "cos_update_to_preferred",
                                                              "distance_ratio"}


def test_no_events_is_reported(tmp_path, embedded, dev_split):
    """Every object the model can name is in this image's ground truth: nothing can be hallucinated."""
    from PIL import Image

    from dleaf_analysis.sources import JsonlSource

    Image.fromarray(dev_split.image(0)).save(tmp_path / "a.png")
    (tmp_path / "a.jsonl").write_text(json.dumps({"image": "a.png", "objects": dev_split.world.classes}) + "\n")
    src = JsonlSource(tmp_path / "a.jsonl")
    src.prompt, src.max_new_tokens = split_prompt = dev_split.world.caption_prompt, 16
    del split_prompt
    with pytest.raises(NoEventsError, match="nothing to study"):
        run_study("ablation", src, limit=1, out=tmp_path / "out", lm=embedded, progress=False)


def test_foreign_output_directory_is_refused(tmp_path, embedded):
    run_study("ablation", "dev", limit=8, out=tmp_path, lm=embedded, progress=False, max_units=1)
    with pytest.raises(SweepMismatchError, match="different run"):
        run_study("ablation", "dev", limit=9, out=tmp_path, lm=embedded, progress=False, max_units=1)
