"""Studies on real checkpoints: image sources (COCO, annotated JSONL), events located in generated
sub-word ids, photo counterfactuals, and every study / tuning / figure / reproduce command end to end
on a tiny LLaVA-1.5-shaped model with a BPE tokenizer and the committed fake COCO (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dleaf_analysis.cli import app
from dleaf_analysis.models.loading import load_model
from dleaf_analysis.paths import EXAMPLES_DIR
from dleaf_analysis.models.tiny import tiny_llava15_subword_dir
from dleaf_analysis.sources import CocoSource, JsonlSource, SourceError, remove_object
from dleaf_analysis.studies.events import event_inputs, find_events, mention_spans, word_ids

FAKE = EXAMPLES_DIR / "fake_coco"
COCO_ARGS = ["--coco-images", str(FAKE / "val2014"), "--coco-annotations", str(FAKE / "instances_fake2014.json")]
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llava15_subword_dir(tmp_path_factory.mktemp("m") / "llava-1.5-subword")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def coco():
    return CocoSource(FAKE / "val2014", FAKE / "instances_fake2014.json", image_ids=FAKE / "image_ids.txt")


@pytest.fixture(scope="module")
def events(lm, coco):
    return find_events(lm, coco, progress=False)


def test_fake_coco_loads_with_instances_and_a_box_only_object(coco):
    assert len(coco) == 6 and coco.key(0) == "900000001"
    assert coco.objects(2) == {"person", "teddy bear", "cat", "umbrella"}  # not in CHAIR's table: instances
    assert "bench" in coco.removable(1)  # its instance has a box and no polygon
    m = coco.mask(1, "bench")
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (90, 119, 60, 84)  # the box [90, 60, 30, 25]
    assert coco.shard(1, 2).items() == coco.items()[1::2]
    with pytest.raises(SourceError, match="not in instances_fake2014.json"):
        CocoSource(FAKE / "val2014", FAKE / "instances_fake2014.json", image_ids=[1, 2])


def test_coco_mentions_follow_chair(coco):
    text = "Two dogs sit by a teddy bear near the table."
    got = [(m.object, m.word) for m in coco.mentions(text)]
    assert got == [("dog", "dogs"), ("teddy bear", "teddy bear"), ("dining table", "table")]


def test_the_tokenizer_splits_object_words(lm):
    tok = lm.tokenizer
    assert all(len(word_ids(tok, w)) >= 2 for w in ("person", "frisbee", "bicycle", "teddy bear", "umbrella"))


def test_event_spans_map_back_to_object_words_exactly(lm, coco, events):
    tok = lm.tokenizer
    assert len(events) and (events.kind == "hallucinated").any() and (events.kind == "grounded").any()
    assert (events.span_end - events.step > 1).any()  # multi-token mentions
    assert "teddy bear" in set(events.token)  # a two-word object
    for ev in events.itertuples():
        span = list(ev.span_ids)
        assert tok.decode(span, skip_special_tokens=True).strip() == ev.word
        assert ev.token_id == span[0] and len(span) == ev.span_end - ev.step
        assert len(ev.prefix_ids) == ev.step
        assert (ev.token in coco.objects(ev.image)) == (ev.kind == "grounded")


def test_events_are_teacher_forceable(lm, coco, events):
    """Prompt + the generated ids before the mention reproduce the model's choice of its first sub-token."""
    for ev in events.head(6).to_dict(orient="records"):
        with torch.no_grad():
            logits = lm.model(**event_inputs(lm, coco, ev)).logits
        assert int(logits[0, -1].argmax()) == ev["token_id"]


def test_preferred_is_present_unmentioned_and_never_the_cue(coco, events):
    h = events[(events.kind == "hallucinated") & events.preferred.notna()]
    assert len(h)
    for ev in h.itertuples():
        assert ev.preferred in coco.objects(ev.image) and ev.preferred != ev.cue
        earlier = events[(events.image == ev.image) & (events.step < ev.step)].token
        assert ev.preferred not in set(earlier)
        assert ev.preferred_id != ev.token_id


def test_span_event_token_sums_the_span_log_probabilities(lm, coco):
    """``event_token="span"``: the margin is the summed log-probability of the mention's sub-tokens
    minus that of the preferred word's, each teacher-forced after the same prefix (checked by hand)."""
    ev = find_events(lm, coco, event_token="span", progress=False)
    ev = ev[(ev.kind == "hallucinated") & ev.preferred.notna()].iloc[0]
    assert len(ev.span_ids) > 1

    def span_logprob(tokens):
        inputs = lm.inputs([coco.image(int(ev.image))], [coco.prompt], list(ev.prefix_ids) + list(tokens))
        with torch.no_grad():
            lp = lm.model(**inputs).logits[0].float().log_softmax(-1)
        start = inputs["input_ids"].shape[1] - len(tokens)
        return sum(float(lp[start - 1 + k, t]) for k, t in enumerate(tokens))

    want = span_logprob(list(ev.span_ids)) - span_logprob(word_ids(lm.tokenizer, ev.preferred))
    assert ev.margin == pytest.approx(want, abs=1e-4)
    first = find_events(lm, coco, progress=False)
    assert not np.allclose(first.margin.dropna().to_numpy()[:3], find_events(
        lm, coco, event_token="span", progress=False).margin.dropna().to_numpy()[:3])


def test_mentions_are_located_in_the_generated_ids_not_a_retokenisation(lm, coco):
    """An unusual segmentation of "a dog" (the word in single letters): the span is where the
    generated pieces are, which re-tokenising the decoded text would not find."""
    tok = lm.tokenizer
    v = tok.get_vocab()
    ids = [v["▁a"], v["▁"], v["d"], v["o"], v["g"], v["."]]
    text, found = mention_spans(coco, tok, ids)
    assert text == "a dog." and tok(text, add_special_tokens=False)["input_ids"] != ids
    assert [(m.object, a, b) for m, a, b in found] == [("dog", 2, 5)]
    ev = find_events(lm, coco, generated=[ids], limit=1)
    assert ev.iloc[0].step == 2 and list(ev.iloc[0].span_ids) == ids[2:5]


@pytest.mark.parametrize("fill", ["blur", "mean"])
def test_counterfactual_differs_only_inside_the_mask(fill):
    src = CocoSource(FAKE / "val2014", FAKE / "instances_fake2014.json", fill=fill)
    for i in range(len(src)):
        orig = np.asarray(src.image(i)).astype(int)
        for obj in sorted(src.removable(i)):
            cf = np.asarray(src.counterfactual(i, obj)).astype(int)
            mask = src.mask(i, obj)
            changed = (cf != orig).any(-1)
            assert not changed[~mask].any(), f"{src.key(i)} {obj}: pixels outside the mask changed"
            assert changed[mask].mean() > 0.5  # the object's pixels are replaced


def test_fill_errors():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="whole image"):
        remove_object(img, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="does not match"):
        remove_object(img, np.ones((3, 4), bool))


def test_split_heldout_is_disjoint_and_deterministic(coco):
    a, b = coco.split_heldout(0.34)
    assert len(a) == 2 and len(b) == 4 and not set(a.items()) & set(b.items())
    assert a.items() == coco.split_heldout(0.34)[0].items()
    assert a.items() == CocoSource(FAKE / "val2014", FAKE / "instances_fake2014.json",
                                   image_ids=coco.items()[::-1]).split_heldout(0.34)[0].items()[::-1]


def test_jsonl_source(tmp_path):
    shutil.copy(FAKE / "val2014" / "COCO_val2014_000900000001.jpg", tmp_path / "a.jpg")
    mask = np.zeros((90, 128), np.uint8)
    mask[30:60, 50:80] = 255
    Image.fromarray(mask).save(tmp_path / "a-dog.png")
    lines = [{"image": "a.jpg", "id": "a", "objects": ["person", {"name": "dog", "mask": "a-dog.png"},
                                                         {"name": "frisbee", "box": [85, 10, 25, 20]}]}]
    f = tmp_path / "images.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = JsonlSource(f)
    assert src.objects(0) == {"person", "dog", "frisbee"} and src.removable(0) == {"dog", "frisbee"}
    assert [(m.object, m.word) for m in src.mentions("Two Dogs and a frisbee.")] == [("dog", "Dogs"), ("frisbee", "frisbee")]
    cf = np.asarray(src.counterfactual(0, "dog")).astype(int)
    changed = (cf != np.asarray(src.image(0)).astype(int)).any(-1)
    assert not changed[mask == 0].any() and changed[mask > 0].any()
    with pytest.raises(SourceError, match="cannot be removed"):
        src.counterfactual(0, "person")
    f.write_text('{"image": "a.jpg"}\n')
    with pytest.raises(SourceError, match='"objects"'):
        JsonlSource(f)


def test_a_scene_split_is_refused_on_a_model_that_cannot_express_it(lm, tmp_path):
    from dleaf_analysis.studies import run_study

    with pytest.raises(SourceError, match="--coco-images"):
        run_study("ablation", "dev", limit=2, lm=lm, out=tmp_path)


@pytest.mark.parametrize("command", [["tune", "--limit", "1"], ["figures", "--only", "fig1_dleaf_workflow"],
                                     ["reproduce", "--quick"], ["study", "dpo", "--split", "test", "--limit", "1"],
                                     ["evaluate", "--split", "test", "--limit", "1"]])
def test_scene_commands_refuse_a_model_that_cannot_express_the_scene(model_dir, tmp_path, command):
    r = run(*command, "--model", model_dir, "--out", tmp_path)
    assert r.exit_code == 2, r.output
    assert "--coco-images" in r.output and "--images-jsonl" in r.output


def test_batch_size_bounds_copies_without_changing_maps(lm, coco, events):
    from dleaf_analysis.studies import causal

    ev = events[(events.kind == "hallucinated") & events.preferred.notna() & events.cue.notna()].iloc[0].to_dict()
    args = (lm, event_inputs(lm, coco, ev), ev["token_id"], int(ev["preferred_id"]),
            event_inputs(lm, coco, ev, counterfactual=True))
    full = causal.causal_maps(*args)
    one = causal.causal_maps(*args, batch_size=1)
    for k, v in full.items():
        np.testing.assert_allclose(one[k], v, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("study", ["ablation", "patching", "localization", "dpo", "calibration", "trigger", "oracle",
                                   "leverage"])
def test_every_study_runs_on_coco_and_resumes(model_dir, tmp_path, study):
    args = ["study", study, "--model", model_dir, *COCO_ARGS, "--image-ids", FAKE / "image_ids.txt",
            "--out", tmp_path, "--batch-size", "2", "--json"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["study"] == study
    manifest = json.loads((tmp_path / study / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "coco"
    tables = {"calibration": "detection", "trigger": "firing_by_type", "oracle": "oracle_summary",
              "leverage": "leverage_summary"}
    if study in tables:
        assert len(pd.read_parquet(tmp_path / study / f"{tables[study]}.parquet"))
    else:
        assert d["summary"]["n_hallucinated"] > 0
    before = (tmp_path / study / "results.jsonl").read_text()
    r = run(*args)
    assert r.exit_code == 0 and (tmp_path / study / "results.jsonl").read_text() == before


@pytest.mark.parametrize("study", ["localization", "calibration"])
def test_shards_merge_to_the_unsharded_result(model_dir, tmp_path, study):
    common = ["--model", model_dir, *COCO_ARGS, "--json", *(["--limit", "3", "--max-units", "4"] if study == "calibration"
                                                             else ["--limit", "6"])]
    assert run("study", study, *common, "--out", tmp_path / "all").exit_code == 0
    for i in range(2):
        r = run("study", study, *common, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}")
        assert r.exit_code == 0, r.output
    r = run("study", study, "--merge", tmp_path / "s0", "--merge", tmp_path / "s1", "--out", tmp_path / "merged")
    assert r.exit_code == 0, r.output
    if study == "calibration":
        a, b = (pd.read_parquet(tmp_path / d / study / "detection.parquet").sort_values(["fault", "detector"])
                .reset_index(drop=True) for d in ("all", "merged"))
        assert len(a)
        pd.testing.assert_frame_equal(a, b)
        return
    key = ["event", "map", "layer", "head"]
    a, b = (pd.read_parquet(tmp_path / d / study / "maps.parquet").sort_values(key).reset_index(drop=True)
            for d in ("all", "merged"))
    pd.testing.assert_frame_equal(a, b)
    sa = pd.read_csv(tmp_path / "all" / study / "localization_summary.csv")
    sb = pd.read_csv(tmp_path / "merged" / study / "localization_summary.csv")
    pd.testing.assert_frame_equal(sa, sb)
    r = run("study", study, "--merge", tmp_path / "s0", "--out", tmp_path / "m2")
    assert r.exit_code == 2 and "incomplete or repeated shards" in r.output


def test_tune_on_held_out_images_and_refuse_overlap(model_dir, lm, tmp_path):
    ids = (FAKE / "image_ids.txt").read_text().split()
    (tmp_path / "tune.txt").write_text("\n".join(ids[:2]))
    (tmp_path / "eval.txt").write_text("\n".join(ids[2:]))
    (tmp_path / "overlap.txt").write_text("\n".join(ids[1:]))
    base = ["tune", "--model", model_dir, *COCO_ARGS, "--image-ids", tmp_path / "tune.txt"]
    r = run(*base, "--eval-image-ids", tmp_path / "overlap.txt", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "disjoint" in r.output
    r = run(*base, "--eval-image-ids", tmp_path / "eval.txt", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    tuned = json.loads((tmp_path / "t" / "tuned_methods.json").read_text())
    assert tuned["weights_hash"] == lm.weights_hash and set(tuned["chosen"]) == {"dleaf", "uniform", "pai", "vcd"}
    assert tuned["tuning_images"] == 2 and tuned["confirmation_images"] == 0  # no --confirm-image-ids
    from dleaf_analysis.settings import tuned_config

    assert tuned_config("dleaf", lm.weights_hash, tmp_path / "t" / "tuned_methods.json") == tuned["chosen"]["dleaf"]
    assert tuned_config("dleaf", "another-model", tmp_path / "t" / "tuned_methods.json") == {}


@pytest.fixture(scope="module")
def coco_reproduce(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-coco")
    r = run("reproduce", "--quick", "--model", model_dir, *COCO_ARGS, "--image-ids", FAKE / "image_ids.txt",
            "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_reproduce_on_coco(coco_reproduce):
    out = coco_reproduce
    tune_ids = set((out / "tuning_images.txt").read_text().split())
    eval_ids = {p: set((out / f"{p}_images.txt").read_text().split()) for p in ("test", "replication")}
    assert tune_ids and all(eval_ids.values()) and not tune_ids & (eval_ids["test"] | eval_ids["replication"])
    assert not eval_ids["test"] & eval_ids["replication"]  # the replication pool is fresh images
    assert tune_ids | eval_ids["test"] | eval_ids["replication"] == set((FAKE / "image_ids.txt").read_text().split())
    s = pd.read_csv(out / "methods_chair.csv")
    assert set(s.method) == {"greedy", "dleaf", "uniform", "pai", "vcd"} and set(s.pool) == {"test", "replication"}
    report = (out / "report.md").read_text()
    assert "tuning/tuned_methods.json" in report  # the settings tuned on the held-out images
    for section in ("## Methods on", "### localization", "### dpo", "### calibration", "## Figures"):
        assert section in report
    for study in ("localization", "dpo", "calibration"):
        assert (out / "studies" / study / "summary.json").is_file()


def test_figures_on_coco_results(model_dir, coco_reproduce, tmp_path):
    from dleaf_analysis.figures import FIGURES

    r = run("figures", "--results", coco_reproduce, "--model", model_dir, *COCO_ARGS, "--out", tmp_path,
            "--n-images", "4")
    assert r.exit_code == 0, r.output
    drawn = {e["figure"] for e in json.loads((tmp_path / "manifest.json").read_text())}
    skipped = {"fig3_abnormal_heads_by_layer", "pope_by_method"}  # scene-word logs; no POPE in a CHAIR run
    assert drawn == set(FIGURES) - skipped
    for n in skipped:
        assert f"figure {n} skipped" in r.output
    assert (tmp_path / "fig2_selective_correction.png").stat().st_size > 10_000


def test_scene_split_shards_merge_too(tmp_path):
    """Shards of a scene split record their shard (unsharded manifests are unchanged) and merge to the
    unsharded maps."""
    common = ["--split", "dev", "--limit", "24", "--json"]  # 16 hallucination events, in both shards
    assert run("study", "ablation", *common, "--out", tmp_path / "all").exit_code == 0
    assert "shard" not in json.loads((tmp_path / "all" / "ablation" / "manifest.json").read_text())
    for i in range(2):
        assert run("study", "ablation", *common, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}").exit_code == 0
    r = run("study", "ablation", "--merge", tmp_path / "s0", "--merge", tmp_path / "s1", "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    key = ["event", "map", "layer", "head"]
    a, b = (pd.read_parquet(tmp_path / d / "ablation" / "maps.parquet").sort_values(key).reset_index(drop=True)
            for d in ("all", "m"))
    assert all(len(pd.read_parquet(tmp_path / f"s{i}" / "ablation" / "maps.parquet")) for i in range(2))
    pd.testing.assert_frame_equal(a, b)
